"""Measures runner's per-step overhead against a hand-written loop doing the same work.

    .venv/bin/python benchmarks/overhead_bench.py      (or `make bench`)

Writes benchmarks/results/overhead.json; the README summarizes it. Both train the same MLP on the same
synthetic data with the same batch size, single process, one thread, no validation and no checkpoints inside
the timed part: what is left is runner's bookkeeping per step (sampler, per-sample seeding, metrics sums,
stop agreement, last-step record).
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runner.config import load_config  # noqa: E402
from runner.data import synthetic  # noqa: E402
from runner.loop import train  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "overhead.json"
SIZE, BATCH, EPOCHS, WIDTH = 8192, 64, 3, 256
SHAPE = [64]


def plain_loop() -> float:
    torch.manual_seed(0)
    data = synthetic(shape=SHAPE, num_classes=10, size=SIZE, val_size=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(data.train, batch_size=BATCH, shuffle=True)
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    for _ in range(EPOCHS):
        for x, y in loader:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return time.perf_counter() - t0


def runner_loop(tmp: str) -> float:
    Path(tmp).mkdir(parents=True)
    job = Path(tmp) / "job.yaml"
    job.write_text(json.dumps({
        "model": {"name": "mlp", "args": {"hidden": [WIDTH]}},
        "data": {"name": "synthetic", "args": {"shape": SHAPE, "size": SIZE, "val_size": 0}, "batch_size": BATCH},
        "train": {"max_epochs": EPOCHS, "progress": "plain"},
        "checkpoint": {"every_epoch": False, "at_end": False},
        "out_dir": f"{tmp}/out",
    }))
    t0 = time.perf_counter()
    train(load_config(job))
    return time.perf_counter() - t0


def main() -> None:
    torch.set_num_threads(1)
    steps = EPOCHS * SIZE // BATCH
    with tempfile.TemporaryDirectory() as tmp:
        rows = [{"loop": "plain", "seconds": min(plain_loop() for _ in range(3))},
                {"loop": "runner", "seconds": min(runner_loop(f"{tmp}/{i}") for i in range(3))}]
    for row in rows:
        row["ms_per_step"] = round(1000 * row["seconds"] / steps, 3)
        row["seconds"] = round(row["seconds"], 3)
    overhead = rows[1]["ms_per_step"] - rows[0]["ms_per_step"]
    results = {"steps": steps, "batch": BATCH, "model": f"MLP 64-{WIDTH}-10", "rows": rows,
               "overhead_ms_per_step": round(overhead, 3)}
    print(json.dumps(results, indent=2))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
