"""Measures what checkpointing costs training, and what a mid-epoch resume costs.

    .venv/bin/python benchmarks/checkpoint_bench.py      (or `make bench`)

Writes benchmarks/results/checkpoint.json; the README summarizes it.
1. Snapshot vs write: `state.capture` (serialize to bytes: the part the training loop waits for) and
   `CheckpointStore.commit` (hash + write + fsync + rename: runs in a background thread), for MLPs of growing
   size, on a local directory and on memory://.
2. Resume position: time to the first batch of an epoch when the sampler starts at 0 vs at 90% of the epoch,
   with a dataset that costs 2 ms per sample to load. Skipping must not load the consumed samples.
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runner.checkpoint import CheckpointStore  # noqa: E402
from runner.data import ShardedSampler, make_loader  # noqa: E402
from runner.dist import DistEnv  # noqa: E402
from runner.state import TrainState, capture  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "checkpoint.json"
ENV = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def model_of(params_millions: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    width = 1024
    layers = max(1, round(params_millions * 1e6 / (width * width)))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()  # AdamW state (2 tensors per parameter) is part of every real checkpoint
    return model, optimizer


def time_it(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_save(sizes=(10, 50)) -> list[dict]:
    rows = []
    for millions in sizes:
        model, optimizer = model_of(millions)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        snapshot = lambda: capture(model, optimizer, None, scaler, TrainState(), ENV)  # noqa: E731
        data = snapshot()
        with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as tmp:
            for name, url in (("local", f"{tmp}/ckpt"), ("memory", f"memory://bench-{millions}")):
                store = CheckpointStore(url)
                step = iter(range(1, 1000))
                write_s = time_it(lambda: store.commit(next(step), {"state.pt": data}, {"step": 0}))
                rows.append({"params_M": millions, "state_MB": round(len(data) / 2**20, 1), "store": name,
                             "snapshot_s": round(time_it(snapshot), 4), "write_s": round(write_s, 4),
                             "write_MB_per_s": round(len(data) / 2**20 / write_s, 1)})
                print(rows[-1], flush=True)
    return rows


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
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    results = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "save": bench_save(),
        "resume_position": bench_resume_position(),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
