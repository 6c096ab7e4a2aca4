"""Everything that must survive a restart, as plain containers of tensors (loads with weights_only=True)."""
from __future__ import annotations

import io
import random
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from . import dist
from .dist import DistEnv
from .data import seed_all
from .errors import CheckpointError, one_line


@dataclass
class TrainState:
    """Where training is. All fields but `sums` are the same on every rank; `sums` are this rank's."""
    epoch: int = 0               # current epoch, 0-based
    sample_in_epoch: int = 0     # the epoch's global position: samples all ranks consumed (data.ShardedSampler)
    step: int = 0                # optimizer steps done
    # one metrics dict per finished epoch ("epoch" numbered from 1, as the log does), then a partial one
    # ("partial": True) where max_steps stopped the run inside an epoch: the epoch's full record replaces it when an
    # extended run finishes that epoch
    history: list = field(default_factory=list)
    best: float | None = None    # early stopping: best value of the watched metric
    bad_epochs: int = 0          # early stopping: epochs since it improved
    finished: bool = False       # training reached its end; a restart has nothing to do
    metric_names: list | None = None  # train.step's metrics, fixed by the run's first step; None: not known yet
    history_epochs_from: int = 1  # 0 in states written before history numbered epochs from 1 (restore renumbers)
    # this rank's running [loss sum, correct, count, one sum per metric name] of the epoch, sample-weighted, on the
    # training device: read only at log and epoch boundaries and saves, never per step
    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))

    def __post_init__(self) -> None:
        if len(self.sums) != 3 + len(self.metric_names or ()):  # a rank new to a resumed run starts at zero
            self.sums = torch.zeros(3 + len(self.metric_names), dtype=torch.float64)

    def shared(self) -> dict:
        """The rank-independent part, as stored under "progress" in state.pt."""
        return {k: v for k, v in asdict(self).items() if k != "sums"}

    def reset_sums(self) -> None:
        self.sums.zero_()

    def track_metrics(self, names: list[str]) -> None:
        """Fix the metric names train.step returns; their running sums follow [loss sum, correct, count]."""
        self.metric_names = list(names)
        self.sums = torch.cat([self.sums[:3], self.sums.new_zeros(len(names))])


def rng_state() -> dict:
    """This process's RNG states, as tensors and plain containers."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Staging:
    """Host copies of the state's tensors: the only part of a save the training thread waits for.

    The writer thread serializes the staged copy; the next save waits for that write first, so a buffer is never
    overwritten while it is written. With `reuse` the buffers live for the whole run (pinned memory for CUDA
    tensors): one more copy of the state in host memory, no allocation per save. Without it each save
    allocates its copy and frees it after the write.
    """

    def __init__(self, reuse: bool = True):
        self.reuse, self.buffers = reuse, {}

    def copy(self, obj, key: str = ""):
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, key)
        if isinstance(obj, dict):
            return {k: self.copy(v, f"{key}.{k}") for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.copy(v, f"{key}.{i}") for i, v in enumerate(obj))
        return obj  # ints, floats, strings, None: immutable

    def _tensor(self, t: torch.Tensor, key: str) -> torch.Tensor:
        if isinstance(t, DTensor):  # a shard (FSDP2): copy this rank's part, keep its place in the global tensor
            return DTensor.from_local(self._tensor(t.to_local(), key), t.device_mesh, t.placements, run_check=False,
                                      shape=t.shape, stride=t.stride())
        buf = self.buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            if self.reuse:
                self.buffers[key] = buf
        return buf.copy_(t.detach(), non_blocking=t.is_cuda)


def capture(model, optimizer, scheduler, scaler, state: TrainState, env: DistEnv, staging: Staging,
            weights: bool = True) -> dict | None:
    """Copy the training state to host memory; every rank must call (per-rank parts are gathered); rank 0 gets
    the copy, which `serialize` streams into the store off the training thread. `weights` False: without the model
    and optimizer states (a sharded checkpoint holds them in its shards).

    Per rank: RNG states and the running metric sums of the epoch, so a resumed rank continues exactly.
    """
    ranks = dist.gather({"rng": rng_state(), "sums": state.sums.tolist()}, env)
    if not env.is_main:
        return None
    staged = staging.copy({
        "model": dist.unwrap(model).state_dict() if weights else None,
        "optimizer": optimizer.state_dict() if weights else None,
        "scheduler": scheduler.state_dict() if scheduler else None,
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
    })
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)  # the non-blocking copies into pinned memory are done
    return {**staged, "ranks": ranks, "progress": state.shared()}


def serialize(staged: dict, out: BinaryIO) -> None:
    """torch.save the staged state into a file object, without torch's per-record CRC32: the store hashes
    every byte with sha256 on the way (and checks it before any load), so the CRC32 pass would only slow the
    writer. torch.load reads such files as usual."""
    crc32 = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(staged, out)
    finally:
        torch.serialization.set_crc32_options(crc32)


def load_bytes(data: bytes, source: str) -> dict:
    """Never executes code from the file: only tensors and plain containers are accepted."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — torch raises UnpicklingError, RuntimeError, EOFError…
        raise CheckpointError(f"{source}: refused to load state.pt ({one_line(e)}); it is damaged or holds "
                              "pickled Python objects, which runner never loads") from None


def restore(saved: dict, model, optimizer, scheduler, scaler, env: DistEnv, source: str, seed: int,
            legacy_batch: int) -> TrainState:
    """Load a captured state into freshly built objects; map the per-rank parts onto this world size.

    Same world size: each rank takes its own RNG state and running sums. Another world size: ranks that
    existed take their RNG state, new ranks seed theirs from (seed, rank, step); rank 0 takes the sum of all
    saved running sums and the others start at zero, so the epoch's reduced metrics stay exact.
    `legacy_batch`: global samples per micro-batch of the run that wrote a format-1 state (position in batches).
    """
    try:
        if saved["model"] is not None:  # None: a sharded checkpoint, whose shards the caller loads
            dist.load_whole_model(model, saved["model"])  # also into an FSDP job: a DDP run continued sharded
            dist.load_whole_optimizer(model, optimizer, saved["optimizer"])
    except (RuntimeError, ValueError, KeyError, IndexError) as e:  # the model or optimizer groups differ
        raise CheckpointError(f"{source} does not fit this job's model or optimizer ({one_line(e)}); resume it with "
                              "the job that wrote it, or start a new run in another checkpoint.dir") from None
    if scheduler is not None and saved["scheduler"] is not None:
        scheduler.load_state_dict(saved["scheduler"])
    if saved["scaler"] is not None and scaler.is_enabled():
        scaler.load_state_dict(saved["scaler"])
    progress = dict(saved["progress"])
    if "batch_in_epoch" in progress:  # format 1 counted this rank's micro-batches
        progress["sample_in_epoch"] = progress.pop("batch_in_epoch") * legacy_batch
    if progress.setdefault("history_epochs_from", 0) == 0:  # numbered from 0 before: as the log numbers them now
        progress["history"] = [{**record, "epoch": record["epoch"] + 1} for record in progress.get("history", [])]
        progress["history_epochs_from"] = 1
    state = TrainState(**progress)
    ranks = saved["ranks"]
    if env.rank < len(ranks):
        set_rng_state(ranks[env.rank]["rng"])
    else:
        seed_all(hash((seed, env.rank, state.step)) & 0x7FFF_FFFF)
    if len(ranks) == env.world_size:
        state.sums = torch.tensor(ranks[env.rank]["sums"], dtype=torch.float64)
    elif env.rank == 0:
        state.sums = torch.tensor([sum(column) for column in zip(*(r["sums"] for r in ranks))], dtype=torch.float64)
    return state
