"""Memory and speed switches that change how the model computes, not what it computes: activation checkpointing
(train.activation_checkpointing), channels-last memory format (train.channels_last) and fused or foreach
optimizers (optim.args.fused, optim.args.foreach). README, "Memory and speed switches".

Applied to the plain model in job.build_job, before FSDP shards it; none changes a state_dict key, so checkpoints,
`runner export` and `model.init_from` see the same model either way.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import types

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from . import dist
from .components import resolve_class
from .config import OptimConfig, RunConfig
from .console import log, warn
from .dist import DistEnv
from .errors import ConfigError, one_line

IMPLEMENTATION_SWITCHES = ("fused", "foreach")  # optimizer arguments that choose a kernel, not the update


def apply(model: nn.Module, cfg: RunConfig, env: DistEnv) -> None:
    """The train.* switches, in place on the model on its device; optim.args.fused/foreach checked before the
    optimizer is built."""
    check_optimizer_switches(cfg.optim, model, env.device)
    if cfg.train.activation_checkpointing:
        blocks = checkpoint_blocks(model, cfg.dist.fsdp_blocks)
        names = ", ".join(sorted({type(b).__name__ for b in blocks}))
        log(f"activation checkpointing: {len(blocks)} block(s) ({names}) recompute their activations in backward", env)
    if cfg.train.channels_last:
        use_channels_last(model, cfg, env)


# --- activation checkpointing ------------------------------------------------------------------------------------

def checkpoint_blocks(model: nn.Module, block_classes: list[str]) -> list[nn.Module]:
    """Each block (as dist.fsdp_blocks picks them) keeps only its inputs in forward and recomputes the rest in
    backward."""
    blocks = dist.fsdp_blocks(model, block_classes)
    if not blocks:
        raise ConfigError(f"train.activation_checkpointing: {type(model).__name__} has no blocks to recompute (no "
                          "nn.ModuleList, and no child module holds parameters); set "
                          "train.activation_checkpointing: false")
    for block in blocks:
        # An instance attribute, not a wrapper module: the state_dict keys (checkpoints, export) stay the same.
        # Bound with MethodType so that a deepcopy of the model recomputes its own blocks, not these.
        block.forward = types.MethodType(recomputed_forward, block)
    return blocks


def recomputed_forward(block: nn.Module, *args, **kwargs):
    """The block's class forward under torch.utils.checkpoint; plain under no_grad (evaluation), where nothing is
    kept for backward anyway."""
    forward = functools.partial(type(block).forward, block)
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    norms = [m for m in block.modules() if getattr(m, "track_running_stats", False) and m.training]
    # Compiled (train.compile), the recomputation is the backward graph's and replays no buffer update; dynamo
    # cannot trace a context_fn anyway.
    if not norms or torch.compiler.is_compiling():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs,
                      context_fn=lambda: (contextlib.nullcontext(), running_stats_kept(norms)))


@contextlib.contextmanager
def running_stats_kept(norms: list[nn.Module]):
    """BatchNorm's running statistics as they were before backward recomputed a forward: updating them again would
    count each batch twice. (Turning track_running_stats off instead changes what batch_norm saves for backward,
    which checkpoint refuses.)"""
    saved = [(buffer, buffer.clone()) for norm in norms for buffer in norm.buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


# --- channels last -----------------------------------------------------------------------------------------------

def use_channels_last(model: nn.Module, cfg: RunConfig, env: DistEnv) -> None:
    """4-D parameters and 4-D float inputs in channels-last memory format; the loop and train.step need no change."""
    if cfg.dist.strategy == "fsdp" and env.distributed:
        raise ConfigError("train.channels_last: FSDP2 (dist.strategy: fsdp) shards only contiguous parameters, and "
                          "channels-last ones are not; set train.channels_last: false, or use dist.strategy: ddp")
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        if env.is_main:
            warn(f"train.channels_last: {type(model).__name__} has no Conv2d layer, so channels-last memory format "
                 "changes nothing here; left as it is")
        return
    model.to(memory_format=torch.channels_last)
    model.register_forward_pre_hook(inputs_channels_last)
    log("channels_last: 4-D parameters and inputs in channels-last memory format", env)


def inputs_channels_last(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.to(memory_format=torch.channels_last) if is_image_batch(a) else a for a in args)


def is_image_batch(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_floating_point()


# --- fused and foreach optimizers ----------------------------------------------------------------------------------

def check_optimizer_switches(cfg: OptimConfig, model: nn.Module, device: torch.device) -> None:
    """optim.args.fused/foreach refused in one line naming the key, at start: an optimizer without the argument
    (torch's TypeError would name only optim.args), and a fused kernel that torch has not for this device or dtype
    (torch would raise at the first step, mid-run)."""
    chosen = [key for key in IMPLEMENTATION_SWITCHES if cfg.args.get(key)]
    if not chosen:
        return
    cls = resolve_class(cfg.name, torch.optim, torch.optim.Optimizer, "optim.name")
    for key in chosen:
        if not takes_keyword(cls, key):
            hint = f"; torch.optim's with one: {', '.join(optimizers_taking(key))}" if key == "fused" else ""
            raise ConfigError(f"optim.args.{key}: {cfg.name} has no {key} implementation (it takes no `{key}` "
                              f"argument); remove optim.args.{key}{hint}")
    if "fused" in chosen:
        for dtype in sorted({p.dtype for p in model.parameters()}, key=str):
            probe_fused_step(cls, cfg, device, dtype)


def optimizers_taking(name: str) -> list[str]:
    """torch.optim's optimizers that take the keyword `name`, as this torch has them."""
    return sorted(n for n, obj in vars(torch.optim).items() if inspect.isclass(obj) and
                  issubclass(obj, torch.optim.Optimizer) and name in inspect.signature(obj).parameters)


def takes_keyword(cls, name: str) -> bool:
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return True  # no signature to read: the optimizer itself will say
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def probe_fused_step(cls, cfg: OptimConfig, device: torch.device, dtype: torch.dtype) -> None:
    """One step of a throwaway one-element parameter, so that torch's own checks of `fused` (with foreach, with
    differentiable, this device and dtype) run now. Other argument errors are build_optimizer's to name."""
    param = torch.zeros(1, dtype=dtype, device=device, requires_grad=True)
    try:
        probe = cls([param], lr=cfg.lr, **cfg.args)
    except (TypeError, ValueError):
        return
    except RuntimeError as e:
        raise ConfigError(f"optim.args.fused: {cfg.name} refuses it ({one_line(e)}); remove optim.args.fused or "
                          "change what it conflicts with") from None
    param.grad = torch.zeros_like(param)
    try:
        probe.step()
    except RuntimeError as e:
        raise ConfigError(f"optim.args.fused: {cfg.name} has no fused kernel for {str(dtype).removeprefix('torch.')} "
                          f"parameters on {device.type} ({one_line(e)}); remove optim.args.fused") from None


def keep_on_load(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """After a load_state_dict (resume, init_optimizer), the optimizer is still this job's: torch replaces the groups
    with the saved ones, so a run saved without `fused` would resume unfused although the job asks for it (drift
    treats the switch as free), and it keeps each saved tensor's layout, so a moment saved contiguous would sit
    beside a channels-last parameter, which CPU's fused AdamW reads element by element in memory order (wrong
    numbers, no error). Returns the optimizer."""
    own = [{k: group[k] for k in IMPLEMENTATION_SWITCHES if k in group} for group in optimizer.param_groups]

    def restore_own(opt: torch.optim.Optimizer) -> None:
        for group, switches in zip(opt.param_groups, own):
            group.update(switches)
            for param in group["params"]:
                conform_state(opt.state.get(param, {}), param, group)

    optimizer.register_load_state_dict_post_hook(restore_own)
    return optimizer


def conform_state(state: dict, param: torch.Tensor, group: dict) -> None:
    """One parameter's loaded state as torch builds it for this group: per-element tensors in the parameter's
    memory layout, the step count on the parameter's device for fused or capturable kernels, else on the host (where
    the unfused step reads it without a device sync)."""
    for key, value in list(state.items()):
        if not isinstance(value, torch.Tensor):
            continue
        if key == "step" and value.dim() == 0:
            on_device = group.get("fused") or group.get("capturable")
            state[key] = value.to(dtype=torch.float32, device=param.device) if on_device else value.cpu()
        elif value.shape == param.shape and value.stride() != param.stride() and is_plain(param, value):
            state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def is_plain(*tensors: torch.Tensor) -> bool:
    """Not DTensors: FSDP2 keeps its shards contiguous, and a DTensor's stride is the global tensor's."""
    return not any(isinstance(t, DTensor) for t in tensors)
