"""train.compile: torch.compile of the model runner trains, the compiler's time on its own clock, and a compile
cache that travels with the checkpoints (docs/design.md, "Compiled training").

In one process with runner's own step, the step (the model's forward, the loss and the correct count) is compiled
as one function; a user's train.step and DDP get the model compiled in place (nn.Module.compile), fsdp its blocks.
Either way the module is never wrapped, so its state_dict keys stay those of the plain module: checkpoints,
init_from, export, summary and the drift rule never see `_orig_mod.` or a wrapper.

The cache is inductor's own cache directory (generated kernels, compiled code, FX and AOT graphs), which runner
points at a folder it controls and carries to the store as one archive beside the checkpoints; torch's portable
artifacts (torch.compiler.save_cache_artifacts) leave the C++ kernels to be built again on a CPU, which was most of
a restart's compile here (benchmarks/compile_bench.py).
"""
from __future__ import annotations

import io
import os
import platform
import tarfile
import threading
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from .config import RunConfig
from .console import log, warn
from .dist import DistEnv, fsdp_blocks
from .errors import RunnerError, one_line
from .events import EventLog
from .step import RunnerStep, Step
from .store import CheckpointStore

CACHE = "compile-cache"  # the side directory on the store, and the folder under out_dir
ARCHIVE = "cache.tar"
# not carried: lock files (per process), and the precompiled C++ header (150 MB, built in seconds, and only
# usable by the same compiler build)
SKIPPED = {"locks", "precompiled_headers"}
RECOMPILE_LIMIT = 64


def compile_model(model: torch.nn.Module, wrapped: torch.nn.Module, step: Step, cfg: RunConfig) -> None:
    """In one process with runner's own step: the step, the model's forward with the loss and the correct count,
    as one graph (RunnerStep.compile). Otherwise `model` (what evaluation runs) and, under DDP, its wrapper too, as
    PyTorch documents for DDP (compiling the DDP module lets it split the graph at bucket boundaries, so the
    all-reduce overlaps backward). Each is compiled once; a wrapper rebuilt for a new phase is compiled again.
    Under dist.strategy fsdp the blocks were compiled before sharding (compile_blocks) and the root stays eager."""
    if cfg.dist.strategy == "fsdp":
        return
    if isinstance(wrapped, DistributedDataParallel):
        for module in (model, wrapped):
            compile_once(module, cfg)
    elif isinstance(step, RunnerStep):
        step.compile(compile_options(cfg))
    else:
        compile_once(model, cfg)


def compile_blocks(model: torch.nn.Module, cfg: RunConfig) -> list[torch.nn.Module]:
    """dist.strategy fsdp: each block (dist.fsdp_blocks, the units FSDP shards) compiled on its own, after
    activation checkpointing and before fully_shard, in torchtitan's order: blocks of one class share one graph
    (compiled once), FSDP's all-gathers and reduce-scatters run between compiled blocks instead of breaking one
    graph of the whole model, and dynamo runs FSDP's hooks eagerly (torch._dynamo.config.skip_fsdp_hooks).
    In place like compile_model, so the sharded state_dict keys stay the plain module's. A model without blocks
    is compiled whole."""
    blocks = fsdp_blocks(model, cfg.dist.fsdp_blocks) or [model]
    for block in blocks:
        compile_once(block, cfg)
    return blocks


def compile_once(module: torch.nn.Module, cfg: RunConfig) -> None:
    """module.compile(): torch.compile of its call, in place (no OptimizedModule, no `_orig_mod.`)."""
    if getattr(module, "_compiled_call_impl", None) is None:
        module.compile(**compile_options(cfg))


def compile_options(cfg: RunConfig) -> dict:
    """torch.compile's arguments from train.compile."""
    c = cfg.train.compile
    # Past dynamo's recompile limit (8 graphs per code object: shapes, train/eval, phases) it runs eagerly from then
    # on, at a point that depends on what this process saw before, which a resumed process may not: raised.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return {"mode": c.mode, "dynamic": c.dynamic, "fullgraph": c.fullgraph, "options": c.options or None}


class CompileClock:
    """Charges the compiler's work to the "compile" activity of the launch's timers (events.Timers), so
    `runner report` shows it apart from start-up and training. Dynamo's callbacks fire once around nested
    compilations, and also around a backward compiled lazily at its first use."""

    def __init__(self, events: EventLog):
        from torch._dynamo.callback import callback_handler

        self.events, self.handler = events, callback_handler
        self.compilations = 0  # how many times the compiler ran: the cache is written when it grew
        self.previous: str | None = None
        self.handler.register_start_callback(self._start)
        self.handler.register_end_callback(self._end)

    def _start(self, _args) -> None:
        self.previous = self.events.timers.switch("compile")

    def _end(self, _args) -> None:
        self.events.timers.switch(self.previous or "other")
        self.compilations += 1

    def close(self) -> None:
        """Stop listening; record how often the compiler ran and how much of it the cache saved (inductor's own
        counters: a graph found in the cache is not compiled again)."""
        self.handler.remove_start_callback(self._start)
        self.handler.remove_end_callback(self._end)
        from torch._dynamo.utils import counters

        inductor = counters["inductor"]
        self.events.emit("compiled", compilations=self.compilations,
                         seconds=self.events.timers.counters()["compile_s"],
                         graph_cache_hits=inductor["fxgraph_cache_hit"],
                         graph_cache_misses=inductor["fxgraph_cache_miss"])


def local_cache_dir(cfg: RunConfig, env: DistEnv) -> Path:
    """Where inductor caches on this rank: $TORCHINDUCTOR_CACHE_DIR when the user set one, else
    <out_dir>/compile-cache/rank-N, not the machine-wide temporary folder shared with every other job (inductor
    reads the variable at each compilation, so setting it here is in time; torch sets it to that default on first
    use, so the default counts as unset)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and chosen != default_cache_dir():
        return Path(chosen)
    path = Path(cfg.out_dir) / CACHE / f"rank-{env.rank}"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path.resolve())
    return path


def signature(device: torch.device) -> dict:
    """What a cache was built for: a cache from another torch, Python, CPU or GPU is not used."""
    sig = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "device": device.type}
    if device.type == "cuda":
        sig.update(gpu=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)),
                   cuda=torch.version.cuda)
    else:
        sig["cpu"] = torch.backends.cpu.get_cpu_capability()
    return sig


def fingerprint(directory: Path) -> tuple:
    """The cache's files and sizes: it changed when this did (inductor writes entries whole, under new names)."""
    return tuple(sorted((str(p.relative_to(directory)), p.stat().st_size) for p in cache_files(directory)))


def cache_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return [p for p in directory.rglob("*") if p.is_file() and not SKIPPED & set(p.relative_to(directory).parts)]


def pack(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(cache_files(directory)):
            tar.add(path, arcname=str(path.relative_to(directory)), recursive=False)
    return buffer.getvalue()


def unpack(data: bytes, directory: Path) -> int:
    """Extract an archive; the "data" filter refuses links and paths outside `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        members = tar.getmembers()
        tar.extractall(directory, filter="data")
    return len(members)


class CompileCache:
    """The local cache directory and its copy on the store, and the compiler's clock.

    restore (every rank, before the first compiled step): an empty local cache is filled from the store's copy
    when that verifies against its manifest and was built for this torch and device; anything else is one
    warning and a compilation from scratch, never a crash. save_if_grown (rank 0, between steps): when the
    compiler ran since the last copy, the directory is archived on the training thread (no compilation can be
    writing it then) and written to the store in the background.
    """

    def __init__(self, cfg: RunConfig, env: DistEnv, store: CheckpointStore, events: EventLog):
        self.env, self.store, self.events, self.clock = env, store, events, CompileClock(events)
        self.enabled = cfg.train.compile.cache
        self.local = local_cache_dir(cfg, env)
        self.url = f"{store.url}/{CACHE}"
        self.saved: tuple | None = None  # the fingerprint of what the store holds (as far as this launch knows)
        self.seen = 0  # clock.compilations when last looked at
        self.writer: threading.Thread | None = None

    def restore(self) -> None:
        if not self.enabled:
            return
        have = len(cache_files(self.local))
        if have:
            self.events.emit("compile_cache", source="local", files=have)
            return
        start = time.perf_counter()
        problem, files, size = self._fetch()
        if problem:
            warn(f"not using the compile cache at {self.url}: {problem}; compiling from scratch", self.env)
        source = "store" if files else "none"
        self.events.emit("compile_cache", source=source, files=files, bytes=size,
                         seconds=round(time.perf_counter() - start, 3), problem=problem or None)
        if files:
            log(f"compile cache: {files} file(s) from {self.url}", self.env)
            self.saved = fingerprint(self.local)

    def _fetch(self) -> tuple[str | None, int, int]:
        """(problem, files extracted, archive bytes)."""
        try:
            found = self.store.read_side(CACHE, ARCHIVE)
        except RunnerError as e:  # corrupt, unreadable, storage down: a cache is never worth a failed start
            return one_line(e), 0, 0
        if found is None:
            return None, 0, 0
        manifest, data = found
        theirs, ours = manifest.get("signature"), signature(self.env.device)
        if theirs != ours:
            differ = sorted(k for k in {*ours, *(theirs or {})} if (theirs or {}).get(k) != ours.get(k))
            shown = ", ".join(f"{k} {(theirs or {}).get(k)} (here {ours.get(k)})" for k in differ)
            return f"it was built for another setup: {shown}", 0, len(data)
        try:
            return None, unpack(data, self.local), len(data)
        except (tarfile.TarError, OSError) as e:
            return f"cannot extract it ({one_line(e)})", 0, len(data)

    def save_if_grown(self) -> None:
        if not (self.enabled and self.env.is_main) or self.clock.compilations == self.seen:
            return
        if self.writer is not None and self.writer.is_alive():
            return  # looked at again after the next step
        self.seen = self.clock.compilations
        now = fingerprint(self.local)
        if not now or now == self.saved:
            return
        data = pack(self.local)
        self.writer = threading.Thread(target=self._write, args=(data, now), name="runner-compile-cache", daemon=True)
        self.writer.start()

    def _write(self, data: bytes, now: tuple) -> None:
        start = time.perf_counter()
        try:
            self.store.commit_side(CACHE, {ARCHIVE: data}, {"signature": signature(self.env.device)})
        except (RunnerError, OSError) as e:
            warn(f"could not write the compile cache to {self.url} ({one_line(e)}); training goes on, and a "
                 "restart on a new machine compiles from scratch", self.env)
            return
        self.saved = now
        self.events.emit("compile_cache_saved", files=len(now), bytes=len(data),
                         seconds=round(time.perf_counter() - start, 3))

    def wait(self, timeout: float | None = None) -> None:
        """Before DataLoader workers fork (a fork copies no other thread, so a lock the writer holds would stay
        held in the worker) and at the end."""
        if self.writer is not None:
            self.writer.join(timeout)

    def close(self, timeout: float) -> None:
        self.wait(timeout)
        self.clock.close()
