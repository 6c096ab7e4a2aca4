"""The first thing to run on a CUDA machine (benchmarks/gpu.sh runs it before its benchmarks): does runner train,
stop and resume exactly there, and does a GPU checkpoint load on a CPU?

    PYTHONPATH=. python benchmarks/gpu_check.py                 # on the GPU: fp16 and bf16
    .venv/bin/python benchmarks/gpu_check.py --device cpu       # a dry run of this script: bf16 and fp32

For each precision, the digits CNN (2 epochs, a checkpoint every 10 steps) trains three times through the CLI:
1. uninterrupted → final weights;
2. SIGTERM at step 15 (RUNNER_TEST_SIGNAL_AT_STEP): exit 75 with the step reached committed, then the same
   command again → final weights, which must equal 1. bit for bit (train.deterministic is on);
3. `runner export ... train.device=cpu` of the interrupted run's checkpoint on the CPU: equal to 2. moved there.
Prints one line per check, writes benchmarks/results/gpu_check.json, exits 1 if any check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "gpu_check.json"
STOP_AT = 15


def job_file(folder: Path, device: str, precision: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    job = folder / "job.yaml"
    job.write_text(json.dumps({
        "model": {"name": "cnn"},
        "data": {"name": "digits", "batch_size": 32},
        "optim": {"name": "AdamW", "lr": 3e-3},
        "train": {"max_epochs": 2, "seed": 0, "device": device, "precision": precision, "progress": "plain"},
        "checkpoint": {"dir": str(folder / "ckpt"), "every_steps": 10},
        "out_dir": str(folder / "out"),
    }))
    return job


def runner(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=900)


def train(folder: Path, device: str, precision: str, stop: bool) -> tuple[dict, list[int], float]:
    """(final weights on the CPU, exit statuses, seconds)."""
    job, dump = job_file(folder, device, precision), folder / "weights"
    t0, statuses = time.perf_counter(), []
    env = {"RUNNER_TEST_DUMP_WEIGHTS": str(dump)}
    if stop:
        first = runner("train", str(job), env={**env, "RUNNER_TEST_SIGNAL_AT_STEP": str(STOP_AT)})
        statuses.append(first.returncode)
    done = runner("train", str(job), env=env)
    statuses.append(done.returncode)
    if done.returncode != 0:
        raise SystemExit(f"runner train failed ({precision}, {device}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return torch.load(dump / "rank0.pt", map_location="cpu", weights_only=True), statuses, time.perf_counter() - t0


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check(device: str, precision: str, tmp: Path) -> dict:
    straight, _, straight_s = train(tmp / f"{precision}-straight", device, precision, stop=False)
    resumed, statuses, resumed_s = train(tmp / f"{precision}-stopped", device, precision, stop=True)
    folder = tmp / f"{precision}-stopped"
    exported = folder / "model.pt"
    export = runner("export", str(folder / "job.yaml"), str(exported), "train.device=cpu")
    on_cpu = torch.load(exported, map_location="cpu", weights_only=True) if export.returncode == 0 else {}
    row = {"precision": precision, "device": device, "straight_s": round(straight_s, 1),
           "stopped_and_resumed_s": round(resumed_s, 1), "exit_statuses": statuses,
           "stopped_with_75": statuses[0] == 75, "resume_bit_identical": same(straight, resumed),
           "checkpoint_loads_on_cpu": export.returncode == 0 and same(on_cpu, resumed)}
    if not row["resume_bit_identical"]:
        row["max_abs_difference"] = max(float((straight[k].float() - resumed[k].float()).abs().max()) for k in straight)
    if export.returncode != 0:
        row["export_error"] = (export.stdout + export.stderr).strip().splitlines()[-1:]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu for a dry run")
    precisions = ("fp16", "bf16") if args.device == "cuda" else ("bf16", "32")
    machine = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        rows = [check(args.device, p, Path(tmp)) for p in precisions]
    for r in rows:
        print(f"{machine} {r['precision']:>4}: SIGTERM at step {STOP_AT} → exit {r['exit_statuses'][0]}, resumed → "
              f"exit {r['exit_statuses'][1]}; bit-identical to the uninterrupted run: {r['resume_bit_identical']}"
              f"{'' if r['resume_bit_identical'] else ' (max |diff| ' + str(r['max_abs_difference']) + ')'}; "
              f"checkpoint loads on the CPU: {r['checkpoint_loads_on_cpu']}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine, "torch": torch.__version__, "checks": rows}, indent=2) + "\n")
    ok = all(r["stopped_with_75"] and r["resume_bit_identical"] and r["checkpoint_loads_on_cpu"] for r in rows)
    print(f"wrote {RESULTS}" + ("" if ok else "; A CHECK FAILED"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
