"""Side by side: a hand-written loop, runner and PyTorch Lightning train the same model on the same data.

    .venv/bin/python benchmarks/compare.py [--repeats 3] [--workloads mlp,cnn] [--device cpu] [--no-compiled]
                                                                                                    (`make bench`)

One process, one intra-op thread, rounds interleaved (raw, runner, lightning, raw, …) so that a shared
machine's drift hits all three alike; the best of N rounds counts. No validation, no checkpoints. Lightning
comes from the `bench` extra (`pip install -e '.[bench]'`); without it its column is skipped.

Three times per run: `total` from nothing built to trained (data, model, optimizer, loop, teardown), `steps`
from the first optimizer step to the last (a global optimizer step hook, outside every compiled graph), which
leaves out each framework's fixed start-up cost, and the median time between two optimizer steps (one step), which a
passing disturbance of this shared machine does not move. The compiled columns (torch.compile, static shapes, one
inductor cache for the whole benchmark) compare with the raw compiled loop, per step: their `total` includes
compiling. Writes benchmarks/results/compare.json. On Linux it runs with fixed glibc
malloc thresholds (MALLOC_TUNABLES; set GLIBC_TUNABLES yourself to override), so that page faults from the
allocator's moving mmap threshold do not decide the ratios.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import http.server
import io
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
import timeit
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runner.config import load_config  # noqa: E402
from runner.data import RNG_SOURCES, Augmented, Datasets, SeededDataset, TokenWindows, synthetic  # noqa: E402
from runner.loop import train  # noqa: E402
from runner.models import GPT, MLP, SmallCNN  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "compare.json"
LR = 1e-3
SEED = 0

# What runner does beyond the raw loop with checkpoints off (runner/loop.py as measured): per step, then once.
RUNNER_EXTRAS = [
    "SeededDataset per sample (passes plain tensors through: they declare no randomness)",
    "GradScaler calls (disabled in fp32); no autocast context in fp32",
    "running sums on the device per micro-batch (3 in-place adds, no host read); one read and all-reduce every"
    " train.log_every_steps (20)",
    "stop/save agreement per step (an async all-reduce on a CPU gloo group under torchrun; none on 1 process)",
    "last_step record (one 20-byte pwrite per step)",
    "the progress watchdog's beat per step (a clock read and a deque append; its thread wakes 4 times a second)",
    "runner+auto: checkpoint.every: auto's measurement per step (the timers read and a writer check), no save",
    "fault-injection (a dict lookup) and checkpoint-cadence checks; the checkpoint lease heartbeat thread",
    "runner compiled: the step (model, loss, correct count) compiled as one graph in one process",
    "once per run (in `total`, not `steps`): config and job build, store probe, lease claim with its settle wait,"
    " config.yaml; per epoch: train metrics and metrics.jsonl",
]


@dataclass(frozen=True)
class Workload:
    name: str
    model: str  # "mlp" or "cnn": the same class runner builds for those names
    shape: tuple[int, ...]
    size: int  # training samples per epoch
    epochs: int
    batch: int

    @property
    def steps(self) -> int:
        return self.epochs * (self.size // self.batch)


WORKLOADS = {
    "mlp": Workload("tiny MLP 64-256-10", "mlp", (64,), size=8192, epochs=3, batch=64),
    "cnn": Workload("small CNN 3x32x32", "cnn", (3, 32, 32), size=1024, epochs=2, batch=32),
    # for GPUs (benchmarks/gpu.sh); far too slow for the default CPU run
    "resnet18": Workload("resnet18 3x224x224", "resnet18", (3, 224, 224), size=1024, epochs=1, batch=64),
    "gpt": Workload("gpt 6x384, 256 tokens", "gpt", (256,), size=1024, epochs=1, batch=32),  # nanoGPT's char model
}
DEFAULT_WORKLOADS = "mlp,cnn"

STEPS: list[float] = []  # perf_counter() at the end of each optimizer step of the loop being timed


def record_step(_optimizer, _args, _kwargs) -> None:
    """A global optimizer hook: eager in every loop, where a model hook would break each loop's compiled graph."""
    STEPS.append(time.perf_counter())


def build_model(workload: str, num_classes: int = 10) -> nn.Module:
    """Seeded like runner seeds before building, so all three start from the same weights."""
    w = WORKLOADS[workload]
    torch.manual_seed(SEED)
    if w.model == "mlp":
        model: nn.Module = MLP(in_features=w.shape[0], num_classes=num_classes, hidden=(256,))
    elif w.model == "gpt":
        model = GPT(vocab_size=256, context=w.shape[0])
    elif w.model == "resnet18":
        import torchvision

        model = torchvision.models.resnet18(num_classes=num_classes)
    else:
        model = SmallCNN(num_classes=num_classes, in_channels=w.shape[0])
    return model


def build_data(workload: str) -> Datasets:
    """Training data only: no validation set, so runner evaluates nothing."""
    w = WORKLOADS[workload]
    if w.model == "gpt":  # random bytes: the step's cost does not depend on what the text says
        tokens = torch.randint(0, 256, (w.size * w.shape[0] + 1,), generator=torch.Generator().manual_seed(SEED))
        return Datasets(TokenWindows(tokens, w.shape[0]), None, 256, w.shape)
    data = synthetic(shape=list(w.shape), num_classes=10, size=w.size, val_size=0, seed=SEED)
    return Datasets(data.train, None, 10, w.shape)


def raw_loop(workload: str, device: torch.device, compiled: bool = False) -> None:
    w = WORKLOADS[workload]
    model = build_model(workload).to(device)
    if compiled:
        model.compile(dynamic=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    loader = DataLoader(build_data(workload).train, batch_size=w.batch, shuffle=True)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(w.epochs):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def runner_loop(workload: str, device: torch.device, tmp: Path, notice: str = "off", compiled: bool = False,
                auto: bool = False) -> None:
    """runner's public entry point on a job file, as `runner train job.yaml` runs it. `notice`: "aws" polls a
    fake metadata server on 127.0.0.1 (RUNNER_METADATA_URL) every 0.2 s, to measure the watcher's cost. `auto`:
    checkpoint.every: auto's per-step measurement, with an interval too long for any save to happen."""
    w = WORKLOADS[workload]
    job = tmp / "job.yaml"
    job.write_text(json.dumps({
        "model": {"name": f"{__name__}:build_model", "args": {"workload": workload}},
        "data": {"name": f"{__name__}:build_data", "args": {"workload": workload}, "batch_size": w.batch},
        "optim": {"name": "AdamW", "lr": LR},
        "train": {"max_epochs": w.epochs, "progress": "plain", "seed": SEED, "device": device.type,
                  "compile": compiled},
        "checkpoint": {"every_epoch": False, "at_end": False,
                       **({"every": "auto", "auto_min_minutes": 1e6, "auto_max_minutes": 1e6} if auto else {})},
        "preemption": {"notice": notice, "notice_poll_s": 0.2},
        "out_dir": str(tmp / "out"),
    }))
    with contextlib.redirect_stdout(io.StringIO()):  # its per-epoch lines would break up the table
        status = train(load_config(job))
    if status != 0:
        raise SystemExit(f"runner exited with status {status} on {workload}")


def lightning_loop(workload: str, device: torch.device, compiled: bool = False) -> None:
    import lightning as L

    w = WORKLOADS[workload]

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = build_model(workload)
            if compiled:
                self.model.compile(dynamic=False)

        def training_step(self, batch, _index):
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=LR)

    trainer = L.Trainer(max_epochs=w.epochs, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(Module(), DataLoader(build_data(workload).train, batch_size=w.batch, shuffle=True))


def lightning_available() -> bool:
    try:
        import lightning  # noqa: F401
    except ImportError:
        print("lightning is not installed (pip install -e '.[bench]'): skipping its column")
        return False
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # "GPU available: …" and tips per fit
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    return True


def timed(run, device: torch.device) -> dict:
    """One run: total seconds, and seconds from the first optimizer step to the last."""
    STEPS.clear()
    gc.collect()
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    gaps = sorted(b - a for a, b in zip(STEPS, STEPS[1:]))
    return {"total_s": total, "steps_s": STEPS[-1] - STEPS[0], "median_step_s": gaps[len(gaps) // 2],
            "optimizer_steps": len(STEPS)}


class NoNotice(http.server.BaseHTTPRequestHandler):
    """A fake AWS metadata service on 127.0.0.1: a token for PUT, 404 (no notice) for every GET."""

    def do_PUT(self) -> None:
        self._reply(200, b"token")

    def do_GET(self) -> None:
        self._reply(404, b"")

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def fake_metadata():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NoNotice)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    os.environ["RUNNER_METADATA_URL"] = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield
    finally:
        del os.environ["RUNNER_METADATA_URL"]
        server.shutdown()


def compare(workload: str, repeats: int, device: torch.device, with_lightning: bool, tmp: Path,
            compiled: bool) -> dict:
    w = WORKLOADS[workload]
    loops = {"raw": lambda: raw_loop(workload, device),
             "runner": lambda: runner_loop(workload, device, Path(tempfile.mkdtemp(dir=tmp)))}
    if workload == "mlp":  # where a per-step cost shows most: the notice watcher polling every 0.2 s
        loops["runner+notice"] = lambda: runner_loop(workload, device, Path(tempfile.mkdtemp(dir=tmp)), "aws")
        loops["runner+auto"] = lambda: runner_loop(workload, device, Path(tempfile.mkdtemp(dir=tmp)), auto=True)
    if with_lightning:
        loops["lightning"] = lambda: lightning_loop(workload, device)
    if compiled:
        loops["raw compiled"] = lambda: raw_loop(workload, device, compiled=True)
        loops["runner compiled"] = lambda: runner_loop(workload, device, Path(tempfile.mkdtemp(dir=tmp)), compiled=True)
        if with_lightning:
            loops["lightning compiled"] = lambda: lightning_loop(workload, device, compiled=True)
    runs: dict[str, list[dict]] = {name: [] for name in loops}
    for _ in range(repeats):
        for name, loop in loops.items():
            torch._dynamo.reset()  # each loop compiles its own model, as a process of its own would
            runs[name].append(timed(loop, device))
    for name, rs in runs.items():
        if any(r["optimizer_steps"] != w.steps for r in rs):
            raise SystemExit(f"{name} trained {rs[0]['optimizer_steps']} steps on {workload}, expected {w.steps}")
    best = {name: {key: min(r[key] for r in rs) for key in ("total_s", "steps_s", "median_step_s")}
            for name, rs in runs.items()}
    for name, b in best.items():
        raw = best["raw compiled" if name.endswith(" compiled") else "raw"]  # compiled against compiled
        b["total_ratio"] = b["total_s"] / raw["total_s"]
        b["steps_ratio"] = b["steps_s"] / raw["steps_s"]
        b["median_step_ratio"] = b["median_step_s"] / raw["median_step_s"]
        b["ms_per_step"] = 1000 * b["steps_s"] / (w.steps - 1)
    return {"workload": w.name, "steps": w.steps, "batch": w.batch, "epochs": w.epochs,
            "results": {name: {k: round(v, 6) for k, v in b.items()} for name, b in best.items()}}


def seeding_cost(repeats: int = 15) -> dict:
    """µs per sample that SeededDataset adds over fetching from its dataset directly, before (every sample
    reseeds python, numpy and torch, as all datasets did) and after (only what the dataset declares)."""
    size = 4096
    batches = [list(range(i, i + 64)) for i in range(0, size, 64)]
    rows = {}
    for label, shape, wrap in (("TensorDataset", [64], lambda d: d), ("Augmented", [1, 8, 8], Augmented)):
        base = wrap(synthetic(shape=shape, size=size, val_size=0).train)
        declared, every = SeededDataset(base, SEED), SeededDataset(base, SEED)
        every.sources = RNG_SOURCES
        fetchers = {"direct": lambda b, base=base: [base[i] for i in b],
                    "before": every.__getitems__, "after": declared.__getitems__}
        best = dict.fromkeys(fetchers, float("inf"))
        for _ in range(repeats):  # interleaved, like the loops
            for name, fetch in fetchers.items():
                best[name] = min(best[name], timeit.timeit(lambda: [fetch(b) for b in batches], number=1))
        us = {name: 1e6 * t / size for name, t in best.items()}
        rows[label] = {"declares": list(declared.sources), "fetch_us": round(us["direct"], 2),
                       "before_us": round(us["before"] - us["direct"], 2),
                       "after_us": round(us["after"] - us["direct"], 2)}
    return rows


def print_table(results: list[dict], seeding: dict) -> None:
    print(f"\n{'workload':<20} {'loop':<18} {'total s':>8} {'× raw':>6} {'steps s':>8} {'× raw':>6} {'ms/step':>8} "
          f"{'median ms':>9} {'× raw':>6}")
    for r in results:
        for name, b in r["results"].items():
            print(f"{r['workload']:<20} {name:<18} {b['total_s']:>8.3f} {b['total_ratio']:>6.2f} "
                  f"{b['steps_s']:>8.3f} {b['steps_ratio']:>6.2f} {b['ms_per_step']:>8.3f} "
                  f"{1000 * b['median_step_s']:>9.3f} {b['median_step_ratio']:>6.2f}")
    print("\nrunner beyond the raw loop (checkpoints off):\n  - " + "\n  - ".join(RUNNER_EXTRAS))
    print("\nper-sample seeding, µs over a direct fetch (before: python+numpy+torch; after: what it declares)")
    for label, row in seeding.items():
        print(f"  {label:<14} declares {tuple(row['declares'])!s:<12} before {row['before_us']:6.2f}  "
              f"after {row['after_us']:6.2f}  (the fetch itself: {row['fetch_us']:.2f})")


# glibc's malloc moves its mmap threshold as large blocks are freed, so whether a step's activations come from
# the heap or from fresh mmaps (a page fault per 4 KiB on every step) depends on what the process freed before:
# measured on the CNN, 90 k vs 485 k page faults per run for the same loop, a 5-18 % swing in step time that
# followed whichever loop ran after the other. Fixed thresholds keep all three loops on the heap.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=67108864:glibc.malloc.trim_threshold=134217728"


def main() -> None:
    if sys.platform == "linux" and "GLIBC_TUNABLES" not in os.environ:  # read at process start: re-exec
        os.environ["GLIBC_TUNABLES"] = MALLOC_TUNABLES
        os.execv(sys.executable, [sys.executable, *sys.argv])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the best counts (default 3)")
    parser.add_argument("--workloads", default=DEFAULT_WORKLOADS, help=f"comma-separated: {', '.join(WORKLOADS)}")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no-compiled", dest="compiled", action="store_false", help="skip the torch.compile columns")
    args = parser.parse_args()
    torch.set_num_threads(1)
    register_optimizer_step_post_hook(record_step)
    device = torch.device(args.device)
    with_lightning = lightning_available()
    with tempfile.TemporaryDirectory() as tmp, fake_metadata():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")  # one cache: every loop finds kernels
        results = [compare(name, args.repeats, device, with_lightning, Path(tmp), args.compiled)
                   for name in args.workloads.split(",")]
    seeding = seeding_cost()
    print_table(results, seeding)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    report = {"machine": machine, "cpus": os.cpu_count(), "device": args.device, "threads": torch.get_num_threads(),
              "python": platform.python_version(), "torch": torch.__version__,
              "lightning": lightning_version() if with_lightning else None, "repeats": args.repeats,
              "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
              "workloads": results, "runner_extras_per_step": RUNNER_EXTRAS, "seeding_us_per_sample": seeding}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def lightning_version() -> str:
    import lightning

    return lightning.__version__


if __name__ == "__main__":
    main()
