"""Restart cost with train.compile: process start to the end of the first optimizer step of a resumed launch.

    .venv/bin/python benchmarks/compile_bench.py [--repeats 2] [--workloads mlp,cnn] [--device cpu]

Per workload a seed run trains one epoch compiled (its checkpoint, its local compile cache, the cache on the store);
then each round restarts from copies of it, interleaved so that a shared machine's drift hits all alike:
  eager        train.compile off: the restart runner has without compile
  cold         compiled, an empty local cache and none on the store: everything compiled again
  warm local   compiled, the seed's local cache (a restart on the same machine)
  new machine  compiled, an empty local cache and the seed's cache on the store (a new VM)
Each launch trains 2 steps and exits. Times come from the launch's events.jsonl (the first_step record's wall
clock, less the moment the process was spawned); the best of N rounds counts. Writes
benchmarks/results/compile.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.compare import cpu_name  # noqa: E402
from runner.compiler import CACHE  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "compile.json"
WORKLOADS = {
    "mlp": {"model": {"name": "mlp", "args": {"hidden": [256]}},
            "data": {"name": "synthetic", "args": {"shape": [64], "num_classes": 10, "size": 2048, "val_size": 256},
                     "batch_size": 64}},
    "cnn": {"model": {"name": "cnn", "args": {"width": 16}},
            "data": {"name": "synthetic", "args": {"shape": [3, 32, 32], "num_classes": 10, "size": 512,
                                                   "val_size": 64}, "batch_size": 32}},
}
KINDS = ("eager", "cold", "warm local", "new machine")


DEVICE = "cpu"


def write_job(folder: Path, workload: str, compiled: bool, max_steps: int | None = None) -> Path:
    job = {**WORKLOADS[workload], "optim": {"name": "AdamW", "lr": 1e-3},
           "train": {"max_epochs": 1, "progress": "plain", "compile": compiled, "device": DEVICE, **(
               {"max_steps": max_steps, "max_epochs": 2} if max_steps else {})},
           "out_dir": str(folder / "out"), "checkpoint": {"dir": str(folder / "ckpt")}}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def launch(job: Path, env: dict) -> tuple[float, float]:
    """Seconds from spawning `runner train job` to the end of its first step (from its events.jsonl), and the
    compiler's seconds in them."""
    out = Path(yaml.safe_load(job.read_text())["out_dir"])
    spawned = time.time()
    proc = subprocess.run([sys.executable, "-m", "runner", "train", str(job)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{job} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    first = [r for r in records if r["event"] == "first_step"][-1]
    return first["time"] - spawned, first.get("compile_s", 0.0)


def restart(seed: Path, workload: str, kind: str, tmp: Path, env: dict) -> tuple[float, float]:
    folder = Path(tempfile.mkdtemp(dir=tmp))
    shutil.copytree(seed / "ckpt", folder / "ckpt")
    if kind != "new machine":
        shutil.rmtree(folder / "ckpt" / CACHE, ignore_errors=True)
    if kind == "warm local":
        shutil.copytree(seed / "out" / CACHE, folder / "out" / CACHE)
    steps = int((seed / "out" / "last_step").read_text())
    return launch(write_job(folder, workload, compiled=kind != "eager", max_steps=steps + 2), env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workloads", default="mlp,cnn")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workload in args.workloads.split(","):
            seed = Path(tmp) / f"seed-{workload}"
            seed.mkdir()
            launch(write_job(seed, workload, compiled=True), env)
            best = {kind: (float("inf"), 0.0) for kind in KINDS}
            for _ in range(args.repeats):
                for kind in KINDS:
                    best[kind] = min(best[kind], restart(seed, workload, kind, Path(tmp), env))
            eager = best["eager"][0]
            results[workload] = {kind: {"to_first_step_s": round(s, 2), "compile_s": round(c, 2),
                                        "x_eager": round(s / eager, 2)} for kind, (s, c) in best.items()}
            for kind, row in results[workload].items():
                print(f"{workload:<5} {kind:<12} {row['to_first_step_s']:>7.2f} s  {row['x_eager']:>5.2f}× eager  "
                      f"(compile {row['compile_s']:.2f} s)", flush=True)
    import torch

    machine = torch.cuda.get_device_name() if DEVICE == "cuda" else cpu_name()
    report = {"machine": machine, "cpus": os.cpu_count(), "device": DEVICE,
              "python": platform.python_version(), "torch": torch.__version__, "repeats": args.repeats,
              "threads": 1, "workloads": results}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
