"""Measures what checkpointing costs training, each figure against a baseline measured in the same run.

    .venv/bin/python benchmarks/checkpoint_bench.py      (or `make bench`)

Writes benchmarks/results/checkpoint.json and prints one table; the README summarizes it. The machine may be
shared, so what travels is ratios: every measurement is interleaved with its baseline, best of a few repeats.
For MLPs of 10 M and 50 M parameters with their AdamW state:
1. Blocked: what a save costs the training thread — `state.capture` into `Staging` buffers (kept from the
   second save on; the first save allocates them) — vs `copy_` of the same tensors into preallocated buffers
   (and the first save, or reuse off, vs `clone`). Target ≤ 1.5×.
2. Write: the writer thread's work, `CheckpointStore.commit` of state.pt streamed by `state.serialize`
   (torch.save straight into the file, each chunk sha256-hashed on a second thread while it is written) to a
   local directory, in MB/s, vs the disk: as many bytes written with os.write (8 MB chunks) + os.fsync to a
   file in the same directory. Target ≥ 80 %. Next to it, the two-pass write runner did before (serialize to
   bytes, then hash, then write), with its parts timed alone.
3. In flight (50 M): mean step time of a small one-thread training loop while the state is written, vs
   without; writer as a thread (runner: lowered CPU priority), the same at normal priority, a thread doing the
   old two-pass write, and a separate process that reads the staged tensors from shared memory. Target ≤ 1.10×.
4. Peak RSS during two saves of the 50 M state, each mode in a fresh process: reuse on, reuse off, and reuse
   on with the old two-pass write.
5. Resume: `runner train` of a job with a 50 M MLP, from launch to its "world size" log line (printed just
   before the first step): resuming its ~577 MB checkpoint vs a cold start (resume.mode=never, empty dir);
   and, in this process, the parts of loading it (read + sha256 check, sha256 alone, torch.load).
6. Resume position: time to the first batch of an epoch when the sampler starts at 0 vs at 90% of the epoch,
   with a dataset that costs 2 ms per sample to load. Skipping must not load the consumed samples.
"""
from __future__ import annotations

import gc
import hashlib
import io
import itertools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from runner.store import CheckpointStore  # noqa: E402
from runner.checkpointer import yield_to_training  # noqa: E402
from runner.data import ShardedSampler, make_loader  # noqa: E402
from runner.dist import DistEnv  # noqa: E402
from runner.state import Staging, TrainState, capture, load_bytes, serialize  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "checkpoint.json"
# RUNNER_BENCH_DEVICE=cuda (benchmarks/gpu.sh): the state lives on the GPU, so a save copies it into pinned host
# buffers; the step loop of the in-flight measurement stays on the CPU.
DEVICE = torch.device(os.environ.get("RUNNER_BENCH_DEVICE", "cpu"))
ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=DEVICE)
SIZES_M = (10, 50)
ROUNDS = 5             # interleaved rounds of each in-process measurement; the best counts
ROUNDS_FAST = 10       # for the sub-second copies, which this shared machine's noise swamps otherwise
ROUNDS_LAUNCH = 3      # for measurements that each start a fresh process
CHUNK = 8 << 20           # the disk baseline's write size
BASELINE_WINDOW_S = 2.0   # how long the step loop runs without a write in flight
MB = 2**20


# --- the state --------------------------------------------------------------------------------------------

def model_of(params_millions: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    width = 1024
    layers = max(1, round(params_millions * 1e6 / (width * width)))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, width, device=DEVICE)).sum().backward()
    optimizer.step()  # AdamW state (2 tensors per parameter) is part of every real checkpoint
    return model, optimizer


def state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors a capture copies: the plain copy baseline copies exactly these."""
    optim = [v for s in optimizer.state_dict()["state"].values() for v in s.values() if isinstance(v, torch.Tensor)]
    return [*model.state_dict().values(), *optim]


def nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def save_fn(model, optimizer) -> Callable[[Staging], dict]:
    scaler = torch.amp.GradScaler(DEVICE.type, enabled=False)
    return lambda staging: capture(model, optimizer, None, scaler, TrainState(), ENV, staging)


# --- timing helpers ---------------------------------------------------------------------------------------

def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    out = fn()  # freed after the clock stops: a save frees its copy after the write, not while training waits
    elapsed = time.perf_counter() - t0
    del out
    return elapsed


def best_interleaved(fns: dict[str, Callable[[], object]], repeats: int = ROUNDS) -> dict[str, float]:
    """Each function once per round, round after round; the fastest time of each."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
            gc.collect()
    return {name: min(ts) for name, ts in times.items()}


def ratio(a: float, b: float) -> float:
    return round(a / b, 3)


# --- 1. blocked -------------------------------------------------------------------------------------------

def bench_blocked(model, optimizer) -> dict:
    """Steady state, in this process: later saves (reused buffers, or reuse off) vs plain copies."""
    save, tensors = save_fn(model, optimizer), state_tensors(model, optimizer)
    reused = Staging(reuse=True)
    save(reused)  # the first save allocates the buffers it then keeps: see first_save
    cuda = DEVICE.type == "cuda"
    buffers = [torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda) for t in tensors]

    def copy_into():
        [b.copy_(t, non_blocking=cuda) for b, t in zip(buffers, tensors)]
        if cuda:
            torch.cuda.synchronize()

    best = best_interleaved({
        "copy_into_s": copy_into,
        "capture_reuse_s": lambda: save(reused),
        "clone_s": lambda: [t.to("cpu", copy=True) for t in tensors],
        "capture_no_reuse_s": lambda: save(Staging(reuse=False)),
    }, repeats=ROUNDS_FAST)
    return {**{k: round(v, 4) for k, v in best.items()},
            "reuse_vs_copy_into": ratio(best["capture_reuse_s"], best["copy_into_s"]),
            "no_reuse_vs_clone": ratio(best["capture_no_reuse_s"], best["clone_s"])}


def first_save(millions: int, what: str) -> float:
    """In a fresh process, as in a real run: the first capture allocates its buffers (pages never touched)."""
    model, optimizer = model_of(millions)
    if what == "clone":
        tensors = state_tensors(model, optimizer)
        return timed(lambda: [t.clone() for t in tensors])
    return timed(lambda: save_fn(model, optimizer)(Staging(reuse=True)))


def bench_first_save(millions: int) -> dict:
    times: dict[str, list[float]] = {"capture": [], "clone": []}
    for _ in range(ROUNDS_LAUNCH):
        for what in times:
            times[what].append(run_child("first-save", str(millions), what))
    save_s, clone_s = min(times["capture"]), min(times["clone"])
    return {"first_save_s": round(save_s, 4), "first_clone_s": round(clone_s, 4),
            "first_save_vs_first_clone": ratio(save_s, clone_s)}


# --- 2. write ---------------------------------------------------------------------------------------------

def write_disk(path: str, size: int, chunk: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        left = size
        while left > 0:
            left -= os.write(fd, chunk[:min(left, len(chunk))])
        os.fsync(fd)
    finally:
        os.close(fd)
    os.unlink(path)


def state_payload(staged: dict) -> Callable:
    """state.pt as the writer thread hands it to the store (Checkpointer._commit): torch.save streamed into
    the file, each chunk hashed on a second thread while it is written."""
    return lambda out: serialize(staged, out)


def to_bytes(staged: dict) -> bytes:
    """What runner did before streaming: the whole state serialized into memory (torch's CRC32 on)."""
    buf = io.BytesIO()
    torch.save(staged, buf)
    return buf.getvalue()


def commit_and_remove(store: CheckpointStore, step: int, payload) -> float:
    t0 = time.perf_counter()
    url = store.commit(step, {"state.pt": payload}, {})
    elapsed = time.perf_counter() - t0
    shutil.rmtree(url)
    return elapsed


def write_parts(staged: dict, path: str) -> dict[str, float]:
    """The work of the old two-pass write one part at a time, to see where the time goes."""
    parts = {}
    t0 = time.perf_counter()
    data = to_bytes(staged)
    parts["serialize_to_bytes_s"] = time.perf_counter() - t0
    del data
    torch.serialization.set_crc32_options(False)
    try:
        t0 = time.perf_counter()
        data = to_bytes(staged)
        parts["serialize_without_crc32_s"], t0 = time.perf_counter() - t0, time.perf_counter()
    finally:
        torch.serialization.set_crc32_options(True)
    hashlib.sha256(data).hexdigest()
    parts["sha256_s"], t0 = time.perf_counter() - t0, time.perf_counter()
    with open(path, "wb") as f:  # one write, flush, fsync
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    parts["write_fsync_s"] = time.perf_counter() - t0
    os.unlink(path)
    return parts


def bench_write(staged: dict, tmp: str) -> dict:
    store, steps, chunk = CheckpointStore(f"{tmp}/ckpt"), itertools.count(1), os.urandom(CHUNK)
    size = store.info(store.commit(0, {"state.pt": state_payload(staged)}, {})).manifest["files"]["state.pt"]["size"]
    shutil.rmtree(f"{tmp}/ckpt")
    disk, runner, two_pass, parts = [], [], [], []
    for _ in range(ROUNDS):
        disk.append(timed(lambda: write_disk(f"{tmp}/disk", size, chunk)))
        runner.append(commit_and_remove(store, next(steps), state_payload(staged)))
        two_pass.append(commit_and_remove(store, next(steps), to_bytes(staged)) + timed(lambda: to_bytes(staged)))
        parts.append(write_parts(staged, f"{tmp}/parts"))
        gc.collect()
    rate = {"disk": size / MB / min(disk), "runner": size / MB / min(runner), "two_pass": size / MB / min(two_pass)}
    return {"bytes": size, "disk_fsync_MB_per_s": round(rate["disk"], 1),
            "runner_MB_per_s": round(rate["runner"], 1), "runner_vs_disk": ratio(rate["runner"], rate["disk"]),
            "two_pass_MB_per_s": round(rate["two_pass"], 1), "two_pass_vs_disk": ratio(rate["two_pass"], rate["disk"]),
            "two_pass_parts_s": {k: round(min(p[k] for p in parts), 4) for k in parts[0]}}


# --- 3. steps with a write in flight ----------------------------------------------------------------------

def step_loop() -> Callable[[], None]:
    """A small training step (~20 ms on one thread)."""
    torch.manual_seed(0)
    net = nn.Sequential(*[m for _ in range(2) for m in (nn.Linear(1024, 1024), nn.ReLU())], nn.Linear(1024, 10))
    optimizer = torch.optim.AdamW(net.parameters())
    x, y = torch.randn(64, 1024), torch.randint(0, 10, (64,))

    def step() -> None:
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step


def mean_step_while(step: Callable[[], None], busy: Callable[[], bool]) -> tuple[float, int]:
    t0, n = time.perf_counter(), 0
    while busy() or n == 0:
        step()
        n += 1
    return (time.perf_counter() - t0) / n, n


def shared_copy(obj):
    """The staged state with every tensor in shared memory: what a writer process would read."""
    if isinstance(obj, torch.Tensor):
        return obj.clone().share_memory_()
    if isinstance(obj, dict):
        return {k: shared_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(shared_copy(v) for v in obj)
    return obj


def writer_process(staged: dict, root: str, inbox, outbox) -> None:
    """A writer in its own process (own GIL): runner's commit each time it is told a step."""
    torch.set_num_threads(1)
    store = CheckpointStore(root)
    while (step := inbox.get()) is not None:
        outbox.put(commit_and_remove(store, step, state_payload(staged)))


def bench_in_flight(staged: dict, tmp: str) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _in_flight(staged, tmp)
    finally:
        torch.set_num_threads(threads)


def _in_flight(staged: dict, tmp: str) -> dict:
    step, store, steps = step_loop(), CheckpointStore(f"{tmp}/thread"), itertools.count(1)
    def runner_thread() -> float:  # as Checkpointer._write: lower priority, then the streamed commit
        yield_to_training()
        return commit_and_remove(store, next(steps), state_payload(staged))

    in_thread = {  # runner's writer thread, the same at normal priority, and the two-pass write it replaced
        "thread": runner_thread,
        "thread_normal_priority": lambda: commit_and_remove(store, next(steps), state_payload(staged)),
        "thread_two_pass": lambda: commit_and_remove(store, next(steps), to_bytes(staged)),
    }
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=writer_process, args=(shared_copy(staged), f"{tmp}/process", inbox, outbox),
                       daemon=True)
    proc.start()
    try:
        inbox.put(0)
        outbox.get(timeout=300)  # started, imported and warmed up
        rows: dict[str, list] = {"baseline": [], **{name: [] for name in in_thread}, "process": []}
        for _ in range(ROUNDS):
            end = time.perf_counter() + BASELINE_WINDOW_S
            rows["baseline"].append((*mean_step_while(step, lambda: time.perf_counter() < end), 0.0))
            for name, write in in_thread.items():
                rows[name].append(_with_thread(step, write))
            end = time.perf_counter() + BASELINE_WINDOW_S
            rows["baseline"].append((*mean_step_while(step, lambda: time.perf_counter() < end), 0.0))
            rows["process"].append(_with_process(step, inbox, outbox))
            gc.collect()
    finally:
        inbox.put(None)
        proc.join(60)
    best = {k: min(v) for k, v in rows.items()}  # (mean step s, steps, write s) of the fastest round
    base = best["baseline"][0]
    out = {"baseline_step_ms": round(base * 1e3, 2), "baseline_steps": best["baseline"][1]}
    for writer in (*in_thread, "process"):
        mean, n, write_s = best[writer]
        out |= {f"{writer}_step_ms": round(mean * 1e3, 2), f"{writer}_steps": n,
                f"{writer}_write_s": round(write_s, 3), f"{writer}_vs_baseline": ratio(mean, base)}
    return out


def _with_thread(step, write: Callable[[], object]) -> tuple[float, int, float]:
    took = []
    writer = threading.Thread(target=lambda: took.append(timed(write)))
    writer.start()
    mean, count = mean_step_while(step, writer.is_alive)
    writer.join()
    return mean, count, took[0]


def _with_process(step, inbox, outbox) -> tuple[float, int, float]:
    inbox.put(1)
    mean, count = mean_step_while(step, outbox.empty)
    return mean, count, outbox.get()


# --- 4. peak RSS ------------------------------------------------------------------------------------------

def rss_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def peak_rss(mode: str) -> dict:
    """Run in a fresh process: two saves of the 50 M state; VmHWM is reset once the model exists."""
    model, optimizer = model_of(50)
    save, state_b = save_fn(model, optimizer), nbytes(state_tensors(model, optimizer))
    staging = Staging(reuse=mode != "no_reuse")  # two_pass: reuse on, serialized to bytes first
    with tempfile.TemporaryDirectory() as tmp:
        store = CheckpointStore(f"{tmp}/ckpt")
        gc.collect()
        base = rss_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        for step in (1, 2):
            staged = save(staging)
            commit_and_remove(store, step, state_payload(staged) if mode != "two_pass" else to_bytes(staged))
            del staged
            gc.collect()
        peak, after = rss_kb("VmHWM"), rss_kb("VmRSS")
    return {"state_MB": round(state_b / MB, 1), "before_MB": round(base / 1024, 1),
            "peak_MB": round(peak / 1024, 1), "after_MB": round(after / 1024, 1),
            "peak_over_state": ratio(peak * 1024, state_b),
            "peak_minus_before_over_state": ratio((peak - base) * 1024, state_b)}


def bench_peak_rss() -> dict:
    if not Path("/proc/self/clear_refs").exists():
        return {"skipped": "needs Linux /proc/self/clear_refs"}
    return {mode: run_child("peak-rss", mode) for mode in ("reuse", "no_reuse", "two_pass")}


CHILDREN = {"first-save": lambda millions, what: first_save(int(millions), what), "peak-rss": peak_rss}


def run_child(*args: str):
    """One measurement in a fresh Python process (its own allocator state); its result is its last line."""
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- 5. resume vs cold start ------------------------------------------------------------------------------

def resume_job(tmp: str) -> Path:
    job = Path(tmp) / "job.yaml"
    job.write_text(json.dumps({
        "model": {"name": "mlp", "args": {"hidden": [1024] * 49}},  # 50.5 M parameters: 577 MiB with AdamW
        "data": {"name": "synthetic", "args": {"shape": [64], "size": 256, "val_size": 0}, "batch_size": 32},
        "train": {"max_steps": 1, "progress": "plain"},
        "checkpoint": {"dir": f"{tmp}/ckpt", "every_epoch": False, "at_end": True},
        "out_dir": f"{tmp}/out",
    }))
    return job


def time_to_first_step(job: Path, overrides: list[str]) -> float:
    """Seconds from launching `runner train` to its "world size" line, printed just before the first step."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "runner", "train", str(job), *overrides], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if seen is None and line.startswith("[runner] world size"):
            seen = time.perf_counter() - t0
    if proc.wait() != 0 or seen is None:
        raise RuntimeError(f"runner train {' '.join(overrides)} failed:\n{''.join(lines[-20:])}")
    return seen


def bench_resume(tmp: str) -> dict:
    job = resume_job(tmp)
    time_to_first_step(job, [])  # commits step 1
    step_dir = next(Path(tmp, "ckpt").glob("step-*"))
    size = (step_dir / "state.pt").stat().st_size
    cold, resumed, parts = [], [], []
    for i in range(ROUNDS_LAUNCH):
        cold.append(time_to_first_step(job, ["resume.mode=never", f"checkpoint.dir={tmp}/cold-{i}",
                                             f"out_dir={tmp}/cold-out-{i}", "checkpoint.at_end=false"]))
        # max_steps raised: the finished run is extended from its checkpoint; nothing is saved, so it stays
        resumed.append(time_to_first_step(job, ["train.max_steps=2", "checkpoint.at_end=false"]))
        parts.append(load_parts(f"{tmp}/ckpt", step_dir.name))
    return {"checkpoint_MB": round(size / MB, 1), "cold_start_s": round(min(cold), 3),
            "resume_s": round(min(resumed), 3), "resume_extra_s": round(min(resumed) - min(cold), 3),
            "resume_vs_cold": ratio(min(resumed), min(cold)),
            "load_parts_s": {k: round(min(p[k] for p in parts), 4) for k in parts[0]}}


def load_parts(root: str, name: str) -> dict[str, float]:
    """Where the extra time of a resume goes, in this process: read + sha256 check, sha256 alone, torch.load."""
    store, parts = CheckpointStore(root), {}
    t0 = time.perf_counter()
    data = store.read(f"{store.url}/{name}")
    parts["read_and_verify_s"], t0 = time.perf_counter() - t0, time.perf_counter()
    hashlib.sha256(data).hexdigest()
    parts["sha256_s"], t0 = time.perf_counter() - t0, time.perf_counter()
    load_bytes(data, name)
    parts["load_bytes_s"] = time.perf_counter() - t0
    return parts


# --- 6. resume position -----------------------------------------------------------------------------------

class SlowDataset(torch.utils.data.Dataset):
    """2 ms per sample, like decoding an image; counts what it loads."""

    def __init__(self, size: int):
        self.size, self.loaded = size, 0

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        self.loaded += 1
        time.sleep(0.002)
        return torch.zeros(4), 0


def bench_resume_position(size: int = 2000, batch: int = 20) -> list[dict]:
    rows = []
    for fraction in (0.0, 0.9):
        ds = SlowDataset(size)
        sampler = ShardedSampler(size, 0, 1, seed=0, shuffle=True, pad=True)
        start = int(size * fraction) // batch * batch
        sampler.set_epoch(3, start=start)
        t0 = time.perf_counter()
        next(iter(make_loader(ds, sampler, batch, num_workers=0)))
        rows.append({"start_fraction": fraction, "first_batch_s": round(time.perf_counter() - t0, 4),
                     "samples_loaded": ds.loaded})
    return rows


# --- report -----------------------------------------------------------------------------------------------

def targets(results: dict) -> list[dict]:
    rows = []
    for s in results["states"]:
        rows += [("blocked: capture, reused buffers / copy_ into buffers", s, s["blocked"]["reuse_vs_copy_into"],
                  "<=", 1.5),
                 ("blocked: first save / first clone (fresh process)", s, s["blocked"]["first_save_vs_first_clone"],
                  "<=", 1.5),
                 ("write: streamed commit / disk with fsync", s, s["write"]["runner_vs_disk"], ">=", 0.8)]
    rows.append(("step time: write in flight (writer thread) / none", results["states"][-1],
                 results["in_flight"]["thread_vs_baseline"], "<=", 1.1))
    return [{"what": what, "params_M": s["params_M"], "value": value, "target": f"{op} {goal}",
             "met": value <= goal if op == "<=" else value >= goal} for what, s, value, op, goal in rows]


def table(results: dict) -> str:
    states, flight, rss, res = results["states"], results["in_flight"], results["peak_rss"], results["resume"]
    head = "".join(f"{s['params_M']:>5} M ({s['state_MB']:.0f} MB)" for s in states)
    lines = [f"{'':58}{head}   target"]

    def row(label: str, key: Callable[[dict], str], target: str = "") -> None:
        lines.append(f"{label:58}" + "".join(f"{key(s):>18}" for s in states) + f"   {target}")
    row("blocked: first save (allocates; fresh process) s", lambda s: f"{s['blocked']['first_save_s']:.3f}")
    row("blocked: first clone (fresh process) s", lambda s: f"{s['blocked']['first_clone_s']:.3f}")
    row("blocked: first save / first clone", lambda s: f"{s['blocked']['first_save_vs_first_clone']:.2f}x")
    row("blocked: capture, reuse off s", lambda s: f"{s['blocked']['capture_no_reuse_s']:.3f}")
    row("blocked: clone s", lambda s: f"{s['blocked']['clone_s']:.3f}")
    row("blocked: capture, reuse off / clone", lambda s: f"{s['blocked']['no_reuse_vs_clone']:.2f}x")
    row("blocked: capture, reused buffers s", lambda s: f"{s['blocked']['capture_reuse_s']:.3f}")
    row("blocked: copy_ into preallocated buffers s", lambda s: f"{s['blocked']['copy_into_s']:.3f}")
    row("blocked: capture reused / copy_", lambda s: f"{s['blocked']['reuse_vs_copy_into']:.2f}x", "<= 1.5x")
    row("write: disk, os.write 8 MB + fsync MB/s", lambda s: f"{s['write']['disk_fsync_MB_per_s']:.0f}")
    row("write: runner (streamed torch.save + sha256) MB/s", lambda s: f"{s['write']['runner_MB_per_s']:.0f}")
    row("write: runner / disk", lambda s: f"{s['write']['runner_vs_disk']:.0%}", ">= 80%")
    row("write: before (serialize to bytes, then commit) / disk", lambda s: f"{s['write']['two_pass_vs_disk']:.0%}")
    for part in ("serialize_to_bytes_s", "serialize_without_crc32_s", "sha256_s", "write_fsync_s"):
        row(f"write:   before, {part} (each alone)", lambda s, p=part: f"{s['write']['two_pass_parts_s'][p]:.3f}")
    lines.append(f"step time with a {states[-1]['params_M']} M write in flight "
                 f"(alone: {flight['baseline_step_ms']:.1f} ms; target <= 1.10x):")
    for writer in ("thread", "thread_normal_priority", "thread_two_pass", "process"):
        lines.append(f"  {writer:24}{flight[f'{writer}_step_ms']:7.1f} ms = {flight[f'{writer}_vs_baseline']:.2f}x"
                     f"  ({flight[f'{writer}_steps']} steps during a {flight[f'{writer}_write_s']:.2f} s write)")
    for mode, r in rss.items():
        if isinstance(r, dict):
            lines.append(f"peak RSS, {mode}: {r['peak_over_state']:.2f}x the state "
                         f"(+{r['peak_minus_before_over_state']:.2f}x over the process before its first save)")
    lines.append(f"resume {res['checkpoint_MB']:.0f} MB: {res['resume_s']:.2f} s to the first step vs cold start "
                 f"{res['cold_start_s']:.2f} s ({res['resume_vs_cold']:.2f}x, +{res['resume_extra_s']:.2f} s); "
                 "in-process " + ", ".join(f"{k} {v:.2f}" for k, v in res["load_parts_s"].items()))
    return "\n".join(lines)


def main() -> None:
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}",
        "write_dir": tempfile.gettempdir(),
        "states": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for millions in SIZES_M:
            model, optimizer = model_of(millions)
            row = {"params_M": millions, "state_MB": round(nbytes(state_tensors(model, optimizer)) / MB, 1),
                   "blocked": {**bench_first_save(millions), **bench_blocked(model, optimizer)}}
            staged = save_fn(model, optimizer)(Staging(reuse=False))
            row["write"] = bench_write(staged, tmp)
            print(row, flush=True)
            results["states"].append(row)
        results["in_flight"] = bench_in_flight(staged, tmp)
        print(results["in_flight"], flush=True)
        del model, optimizer, staged
        gc.collect()
        results["peak_rss"] = bench_peak_rss()
        results["resume"] = bench_resume(tmp)
        print(results["resume"], flush=True)
    results["resume_position"] = bench_resume_position()
    results["targets"] = targets(results)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(CHILDREN[sys.argv[2]](*sys.argv[3:])))
    else:
        main()
