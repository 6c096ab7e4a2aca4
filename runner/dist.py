"""torchrun environment → process group, device, the strategy (DDP, or FSDP2 sharding), and the few collectives
the loop needs.

Without torchrun's environment (no WORLD_SIZE) nothing is initialized: world size 1, plain calls.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from .config import DistConfig
from .console import warn
from .errors import ConfigError, RunnerError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or tdist.is_initialized()


def setup(cfg: DistConfig, device: str) -> DistEnv:
    """Initialize from torchrun's variables; choose the device and backend."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if "WORLD_SIZE" in os.environ and not tdist.is_initialized():
        backend = pick_backend(cfg.backend, dev)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        tdist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=cfg.timeout_s),
            device_id=dev if backend == "nccl" else None,
        )
        if rank == 0:
            warn_shared_store_restarts()
    return DistEnv(rank, local_rank, world_size, dev)


def warn_shared_store_restarts() -> None:
    """torchrun --max-restarts with its default shared TCPStore: a restarted group can read the previous
    group's connection keys and fail to connect or hang (pytorch/pytorch#135712; seen here with torch 2.14)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and \
            int(os.environ.get("TORCHELASTIC_MAX_RESTARTS") or 0) > 0:
        warn("torchrun --max-restarts shares its rendezvous store with the workers, so a restarted group may "
             "read the old group's addresses and fail to connect (pytorch/pytorch#135712); set "
             "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment for reliable restarts")


def set_deterministic(device: torch.device, enabled: bool) -> None:
    """What bit-exact resume needs on CUDA: deterministic algorithms (a warning for ops without one), no cuDNN
    autotuning, and a fixed cuBLAS workspace (read when cuBLAS starts, so before the first matmul). The CPU is
    deterministic already."""
    if device.type != "cuda" or not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        if choice == "cuda":
            raise ConfigError(f"LOCAL_RANK {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                              "lower --nproc-per-node or use train.device=cpu")
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def pick_backend(choice: str, device: torch.device) -> str:
    if choice == "nccl" and device.type != "cuda":
        raise ConfigError("dist.backend is 'nccl' but this rank has no GPU; use 'auto' or 'gloo'")
    if choice == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return choice


def teardown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


HALF_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}  # train.precision → compute dtype; "32": none


def shard(model: torch.nn.Module, cfg: DistConfig, env: DistEnv, precision: str) -> torch.nn.Module:
    """dist.strategy fsdp: FSDP2 on a 1-D mesh of all ranks (a CPU mesh under gloo, also where GPUs exist:
    pytorch/pytorch#132471): each block its own unit, then the root; its parameters become this rank's shards
    (DTensors), so build the optimizer after this. bf16 and fp16 compute in half precision and reduce and keep the
    master weights in fp32. One process without torchrun trains the plain model (and still writes sharded
    checkpoints)."""
    if not tdist.is_initialized():
        return model
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    half = HALF_PRECISION.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32) if half else MixedPrecisionPolicy()
    for block in fsdp_blocks(model, cfg.fsdp_blocks):
        fully_shard(block, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward, mp_policy=policy)
    return model


def fsdp_blocks(model: torch.nn.Module, names: list[str]) -> list[torch.nn.Module]:
    """The modules sharded as one unit each: those of the classes `names` (dist.fsdp_blocks), else the members of
    every nn.ModuleList, else every direct child that holds parameters."""
    if names:
        found = [m for m in model.modules() if type(m).__name__ in names and m is not model]
        if not found:
            present = sorted({type(m).__name__ for m in model.modules()})
            raise ConfigError(f"dist.fsdp_blocks: no module of class {', '.join(names)} in the model; it has "
                              f"{', '.join(present)}")
        return found
    lists = [child for m in model.modules() if isinstance(m, torch.nn.ModuleList) for child in m]
    return lists or [c for c in model.children() if any(True for _ in c.parameters())]


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def load_whole_model(model: torch.nn.Module, state: dict, strict: bool = True) -> None:
    """Whole tensors (a DDP checkpoint, an init_from file) into `model`, sharded or not: under FSDP each rank keeps
    its shard of every tensor, and holds the whole state only while this runs."""
    if not is_sharded(model):
        unwrap(model).load_state_dict(state, strict=strict)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))


def load_whole_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """optimizer.state_dict() of a whole model into `optimizer`, sharded or not. torch keys each parameter's state
    by its position in the groups, DCP by the parameter's name: the same position in this optimizer names it."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    by_name = {"state": {order[i]: v for i, v in state["state"].items()},
               "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}
    # not strict: parameters frozen so far (finetune.phases) have no state, as in the optimizer that saved it
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True, strict=False))


def gradient_sync(model: torch.nn.Module, sync: bool):
    """A context in which backward reduces gradients over ranks only when `sync` (the accumulation group's last
    micro-batch): DDP's no_sync, FSDP2's requires_gradient_sync (no reduce-scatter before the last)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return model.no_sync() if not sync and isinstance(model, DistributedDataParallel) else contextlib.nullcontext()


def wrap(model: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """DDP over the parameters that require grad *now*; call again when that set changes. A sharded (FSDP2) model
    trains as it is: its frozen parameters simply get no gradients."""
    if not env.distributed or is_sharded(model):
        return model
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("nothing to train: every parameter is frozen in this phase (finetune.phases)")
    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def all_sum(values, env: DistEnv) -> list[float]:
    """Sum floats over ranks (in float64 so sums of per-sample losses stay exact-ish)."""
    return all_reduce(values, tdist.ReduceOp.SUM, env)


def any_rank(flags: list[bool], env: DistEnv) -> list[bool]:
    """For each flag: true on every rank if it is true on any rank — how ranks agree on control flow."""
    return [v > 0 for v in all_reduce([float(f) for f in flags], tdist.ReduceOp.MAX, env)]


def all_reduce(values, op, env: DistEnv) -> list[float]:
    """`values`: floats, or a float64 tensor (left unchanged); the result is read to the host."""
    t = values.clone() if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float64)
    if env.distributed:
        t = t.to(env.device) if env.device.type == "cuda" else t.cpu()
        tdist.all_reduce(t, op=op)
    return t.cpu().tolist()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        tdist.barrier()


def broadcast_buffers(model: torch.nn.Module, env: DistEnv) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, as DDP does before each forward."""
    if env.distributed:
        for buffer in model.buffers():
            tdist.broadcast(buffer, src=0)


def broadcast(obj, env: DistEnv, group=None):
    """Rank 0's `obj` on every rank (plain Python objects); `group`: another process group of all ranks."""
    if not env.distributed:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def from_rank0(fn, env: DistEnv):
    """fn() on rank 0, its result on every rank; a RunnerError it raises is raised on every rank, so one rank's
    refusal does not leave the others waiting in the next collective until the timeout."""
    outcome = None
    if env.is_main:
        try:
            outcome = (fn(), None)
        except RunnerError as e:
            outcome = (None, e)
    result, error = broadcast(outcome, env)
    if error is not None:
        raise error
    return result


def gather(obj, env: DistEnv, group=None) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    tdist.all_gather_object(out, obj, group=group)
    return out


def side_group(env: DistEnv, timeout_s: float):
    """A second gloo group of all ranks, for collectives off the training thread (a background checkpoint write):
    two threads must never share one group. Every rank calls this at the same point; None without torchrun."""
    if not env.distributed:
        return None
    return tdist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
