"""Config → the objects that train: data, model (new head, phase plan), loss, optimizer, scheduler, scaler.

Shared by `runner train` (loop.py), `runner summary` and `runner export`, which build the same model without
importing the loop. It only builds: pretrained weights (`model.init_from`) are loaded by a fresh start
(`continuation.load_init_weights`), since a resumed run's checkpoint replaces them anyway.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import dist, finetune, tuning
from .compiler import compile_blocks
from .components import build_loss, build_model, build_optimizer, build_scheduler, build_step
from .config import RunConfig
from .data import Datasets, build_datasets
from .dist import DistEnv
from .errors import ConfigError
from .step import RunnerStep, Step, UserStep


@dataclass
class Job:
    """Everything built from the config; `model` is the plain module, `wrapped` what trains (DDP or not)."""
    cfg: RunConfig
    env: DistEnv
    data: Datasets
    model: nn.Module
    step_fn: Step  # what one batch computes: runner's loss(model(x), y) or the user's train.step
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    phases: list
    head: str | None
    accumulate: int  # micro-batches per optimizer step on this world size
    wrapped: nn.Module | None = None
    phase: int | None = None


def build_job(cfg: RunConfig, env: DistEnv) -> Job:
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    user_step = build_step(cfg.train.step)
    data = build_datasets(cfg.data)
    if env.world_size > len(data.train):  # padding would give ranks unequal steps, and a collective would hang
        raise ConfigError(f"data: the training set has {len(data.train)} sample(s), fewer than the "
                          f"{env.world_size} processes; every rank needs at least one sample per epoch")
    model, phases, head = build_model_for(cfg, data)
    model.to(env.device)
    tuning.apply(model, cfg, env)  # before sharding: FSDP2 shards the blocks as they recompute
    if cfg.dist.strategy == "fsdp":
        if cfg.train.compile.enabled:
            compile_blocks(model, cfg)  # each block before fully_shard shards it (torchtitan's order)
        model = dist.shard(model, cfg.dist, env, cfg.train.precision)  # before the optimizer: it holds the shards
        if data.val is not None and len(data.val) < env.world_size:  # each rank's forwards are collectives
            raise ConfigError(f"data: the validation set has {len(data.val)} sample(s), fewer than the "
                              f"{env.world_size} processes; under dist.strategy=fsdp every rank evaluates")
    optimizer = tuning.keep_on_load(build_optimizer(cfg.optim, finetune.param_groups(model, phases, head)))
    if cfg.train.precision == "fp16" and env.device.type != "cuda":
        raise ConfigError("train.precision: fp16 needs a CUDA device; use bf16 on CPU")
    scaler = grad_scaler(cfg, env, model)
    loss_fn = build_loss(cfg.train.loss)
    step_fn = UserStep(user_step, cfg.train.step) if user_step else RunnerStep(loss_fn)
    return Job(cfg, env, data, model, step_fn, optimizer, build_scheduler(cfg.scheduler, optimizer), scaler, phases,
               head, accumulation(cfg, env.world_size))


def grad_scaler(cfg: RunConfig, env: DistEnv, model: nn.Module) -> torch.amp.GradScaler:
    """fp16's loss scaling. Sharded, each rank sees only its shards' gradients: ShardedGradScaler agrees over the
    ranks on whether any was non-finite, so that all skip the same steps."""
    enabled = cfg.train.precision == "fp16"
    if dist.is_sharded(model):
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(env.device.type, enabled=enabled)
    return torch.amp.GradScaler(env.device.type, enabled=enabled)


def accumulation(cfg: RunConfig, world_size: int) -> int:
    """train.accumulate, or what data.global_batch_size needs on this many processes."""
    target, micro = cfg.data.global_batch_size, cfg.data.batch_size
    if target is None:
        return cfg.train.accumulate
    if target % (micro * world_size):
        sizes = [w for w in range(1, target // micro + 1) if target % (micro * w) == 0]
        raise ConfigError(f"data.global_batch_size {target} is not a multiple of data.batch_size {micro} × "
                          f"{world_size} process(es) = {micro * world_size}; with this batch size it works on "
                          f"{', '.join(map(str, sizes)) or 'no'} process(es); change data.batch_size or the "
                          "number of processes")
    return target // (micro * world_size)


def build_model_for(cfg: RunConfig, data: Datasets) -> tuple[nn.Module, list, str | None]:
    """The model as training sees it, head replaced, with its phase plan; no pretrained weights yet."""
    model = build_model(cfg.model, data.num_classes, data.input_shape)
    head = cfg.finetune.head.module if cfg.finetune.head else None
    phases = [finetune.Phase(p.epochs, tuple(p.train), dict(p.lr_mult)) for p in cfg.finetune.phases]
    finetune.validate_plan(model, phases, head)  # first: a misnamed module fails naming its key, before any load
    if cfg.finetune.head:
        finetune.replace_head(model, head, cfg.finetune.head.num_classes)
    return model, phases, head



def example_batch(data: Datasets, n: int = 2) -> torch.Tensor:
    """A few training inputs, for summaries and export tracing: the x of (x, y) samples."""
    samples = [data.train[i] for i in range(min(n, len(data.train)))]
    if not all(isinstance(s, (tuple, list)) and isinstance(s[0], torch.Tensor) for s in samples):
        raise ConfigError(f"data: samples are {type(samples[0]).__name__}s, not (input tensor, target) pairs; "
                          "summary and export trace the model with one input tensor, so they need such samples")
    return torch.stack([s[0] for s in samples])
