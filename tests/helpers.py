"""Shared test helpers: tiny job files, running the real CLI and torchrun, reading checkpoints back."""
from __future__ import annotations

import copy
import io
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

# A job small enough to train in seconds on 2 cores, with dropout and BatchNorm in the model.
TINY_JOB = {
    "model": {"name": "cnn", "args": {"width": 8, "dropout": 0.2}},
    "data": {"name": "digits", "batch_size": 32},
    "optim": {"name": "AdamW", "lr": 0.01},
    "train": {"max_epochs": 2, "seed": 0, "progress": "plain"},
}


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def write_job(folder: Path, name: str = "job", base: dict = TINY_JOB, **sections) -> Path:
    """Write TINY_JOB merged with `sections` to folder/name.yaml; out_dir defaults to folder/name."""
    job = merge(base, sections)
    job.setdefault("out_dir", str(folder / name))
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNNER_TEST_", "TORCHELASTIC_"))}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(*args, env: dict | None = None, timeout: float = 300, cwd: Path | None = None):
    """`python -m runner ARGS` in a subprocess; returns CompletedProcess with text output."""
    return subprocess.run([sys.executable, "-m", "runner", *map(str, args)], capture_output=True, text=True,
                          env=child_env(**(env or {})), timeout=timeout, cwd=cwd or REPO)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, found by parent pid in /proc (torchrun puts workers in their own sessions,
    so killing its process group would miss them)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def table_row(text: str, first_cell: str) -> list[str]:
    """The cells of the printed table row starting with `first_cell` (cells are separated by 2+ spaces)."""
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row for {first_cell}:\n{text}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc: int, *args, extra: tuple = ()) -> list[str]:
    """torchrun on loopback with a free port (standalone rendezvous would pick a port too, but may race)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", *extra,
            "-m", "runner", *map(str, args)]


def run_torchrun(nproc: int, *args, env: dict | None = None, timeout: float = 300, extra: tuple = ()):
    return subprocess.run(torchrun_cmd(nproc, *args, extra=extra), capture_output=True, text=True,
                          env=child_env(OMP_NUM_THREADS=1, **(env or {})), timeout=timeout, cwd=REPO)


def newest_state(ckpt_dir, storage_options: dict | None = None) -> tuple[dict, dict]:
    """(state, manifest) of the newest valid checkpoint in a store."""
    from runner.checkpoint import CheckpointStore

    store = CheckpointStore(str(ckpt_dir), storage_options)
    info = store.latest_valid()
    assert info is not None, f"no valid checkpoint in {ckpt_dir}"
    state = torch.load(io.BytesIO(store.read(info)), map_location="cpu", weights_only=True)
    return state, info.manifest


def assert_tensors_equal(a, b, path: str = "") -> None:
    """Bit-identical nested containers of tensors (torch.equal on every tensor)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys differ"
        for key in a:
            assert_tensors_equal(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tensors_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def ok(proc) -> str:
    """Assert a CompletedProcess succeeded; return its combined output for further checks."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-4000:]}"
    return out
