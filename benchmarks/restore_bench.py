"""Restore from the node-local tier vs the durable store: process start to the end of the first step of a launch
that resumes a ~500 MB checkpoint (an MLP of 42 M parameters with its AdamW state).

    .venv/bin/python benchmarks/restore_bench.py [--repeats 2]

One seed run per store crashes after its checkpoint of step 4; each round restarts from a copy, interleaved:
  local tier   checkpoint.local_dir on /dev/shm, durable copies on S3 (the same step in both: the local one is read)
  local disk   checkpoint.dir a local folder, no local tier
  S3           checkpoint.dir on a moto S3 server on 127.0.0.1 (the repository's test server), no local tier
next to a fresh start of the same job (nothing to restore). The best of N rounds counts. Writes
benchmarks/results/restore.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.compare import cpu_name  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "restore.json"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
JOB = {  # 4096 → 4096 → 4096 → 2048 → 10: 42 M parameters, state.pt ≈ 12 bytes a parameter with AdamW
    "model": {"name": "mlp", "args": {"hidden": [4096, 4096, 2048]}},
    "data": {"name": "synthetic", "args": {"shape": [4096], "num_classes": 10, "size": 256, "val_size": 0},
             "batch_size": 32},
    "optim": {"name": "AdamW", "lr": 1e-3},
    "train": {"max_epochs": 2, "progress": "plain", "seed": 0},
    "checkpoint": {"every_steps": 4, "every_epoch": False, "keep_last": 1},
    "watchdog": {"enabled": False},
}


def moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **S3_ENV})
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return proc, endpoint
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the moto server did not start")


def job_file(folder: Path, checkpoint: dict) -> Path:
    job = {**JOB, "checkpoint": {**JOB["checkpoint"], **checkpoint}, "out_dir": str(folder / "out")}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def launch(job: Path, env: dict, *overrides: str, expect: int = 0) -> float:
    """Seconds from spawning to the end of the launch's first step."""
    out = Path(yaml.safe_load(job.read_text())["out_dir"])
    spawned = time.time()
    proc = subprocess.run([sys.executable, "-m", "runner", "train", str(job), *overrides], env=env,
                          capture_output=True, text=True)
    if proc.returncode != expect:
        raise SystemExit(f"{job}: exit {proc.returncode}, expected {expect}:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == "first_step"][-1]["time"] - spawned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    env = {**os.environ, **S3_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    server, endpoint = moto()
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing")
    best: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            def fresh_s3() -> dict:
                bucket = f"bench-{uuid.uuid4().hex[:12]}"
                fs.mkdir(bucket)
                return {"dir": f"s3://{bucket}/ckpt", "storage_options": {"endpoint_url": endpoint}}

            kinds = {"fresh start": lambda f: {"dir": str(f / "ckpt")},
                     "local tier": lambda f: {**fresh_s3(), "local_dir": str(shm / f"runner-bench-{f.name}")},
                     "local disk": lambda f: {"dir": str(f / "ckpt")},
                     "S3": lambda f: fresh_s3()}
            for _ in range(args.repeats):
                for kind, checkpoint in kinds.items():
                    folder = Path(tempfile.mkdtemp(dir=tmp))
                    job = job_file(folder, checkpoint(folder))
                    if kind != "fresh start":  # a crash after step 5: the newest checkpoint is step 4
                        launch(job, {**env, "RUNNER_TEST_FAIL_AT_STEP": "5"}, expect=1)
                    seconds = launch(job, env, "train.max_steps=6")
                    best[kind] = min(best.get(kind, float("inf")), seconds)
                    print(f"{kind:<12} {seconds:6.2f} s", flush=True)
                    shutil.rmtree(shm / f"runner-bench-{folder.name}", ignore_errors=True)
    finally:
        server.terminate()
        server.wait()
    size = 12 * 42_000_000
    rows = {kind: {"to_first_step_s": round(s, 2), "restore_s": round(s - best["fresh start"], 2)}
            for kind, s in best.items()}
    for kind, row in rows.items():
        print(f"{kind:<12} {row['to_first_step_s']:6.2f} s to the first step, {row['restore_s']:+6.2f} s over a "
              "fresh start")
    report = {"machine": cpu_name(), "cpus": os.cpu_count(), "state_bytes_approx": size, "local_dir": str(shm),
              "repeats": args.repeats, "results": rows}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
