"""Shared test helpers: tiny job files; building, launching and running `runner` and torchrun commands, each
launch in its own session with nothing it started left behind; reading checkpoints back."""
from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
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


# --- commands --------------------------------------------------------------------------------------------------

RUNNER_MODULE = ("-m", "runner")  # what torchrun launches unless told otherwise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def runner_cmd(*args) -> list[str]:
    """`python -m runner ARGS` with this interpreter."""
    return [sys.executable, *RUNNER_MODULE, *map(str, args)]


def torchrun_cmd(*args, nproc: int = 2, port: int | None = None, max_restarts: int = 0, extra: tuple = (),
                 entry: tuple = RUNNER_MODULE) -> list[str]:
    """torchrun running `entry ARGS` on `nproc` processes, c10d rendezvous on 127.0.0.1:`port` (default: a free
    one; standalone rendezvous would pick a port too, but may race). `extra` are more torchrun options; `entry`
    can also be ("--no-python", "runner") or (path to the console script,). Several agents of one multi-node
    job need the same `port`."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port or free_port()}", f"--max-restarts={max_restarts}", *map(str, extra),
            *map(str, entry), *map(str, args)]


# --- processes -------------------------------------------------------------------------------------------------
# Every launch runs in its own session and tags its environment with TAG=<uuid>; every process it starts
# (torchrun's workers, DataLoader workers) inherits the tag, so kill_everything finds them all, even orphans
# whose parent is gone and workers that torchrun put in sessions of their own.

TAG = "TEST_LAUNCH_TAG"


def _popen(cmd: list[str], env: dict, cwd: Path | None = None, **popen) -> subprocess.Popen:
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(cmd, cwd=cwd or REPO, start_new_session=True, env=child_env(**env, **{TAG: tag}),
                            **popen)
    proc.tag = tag
    return proc


def start(cmd: list[str], log: Path, **env) -> subprocess.Popen:
    """Popen in a new session (its own process group), stdout and stderr appended to `log`, one intra-op thread.

    PYTHONFAULTHANDLER: fault_helpers.finish makes a launch that hangs print every thread's stack before it is
    killed.
    """
    with open(log, "ab") as f:
        return _popen(cmd, {"OMP_NUM_THREADS": 1, "PYTHONFAULTHANDLER": 1, **env}, stdout=f, stderr=subprocess.STDOUT)


@contextlib.contextmanager
def launched(cmd: list[str], log: Path, **env):
    """`start` whose whole process tree is killed on the way out, however the test ends."""
    proc = start(cmd, log, **env)
    try:
        yield proc
    finally:
        kill_everything(proc)


RUN_TIMEOUT = 240  # under pytest-timeout's 300 s, so that a hang fails with its output and stacks, not pytest's


def dump_stacks(proc: subprocess.Popen) -> None:
    """SIGABRT every process of the launch: under PYTHONFAULTHANDLER each prints its threads' stacks first."""
    for pid in tagged(proc.tag):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGABRT)
    time.sleep(3)


def run(cmd: list[str], env: dict | None = None, timeout: float = RUN_TIMEOUT, cwd: Path | None = None
        ) -> subprocess.CompletedProcess:
    """`cmd` to its end in child_env(**env), text output captured. Unlike subprocess.run, a timeout (or any
    exception) kills everything `cmd` started, not only `cmd`: torchrun's workers would outlive a killed agent.
    A timeout fails with the output so far and every process's stacks."""
    env = {"PYTHONFAULTHANDLER": 1, **(env or {})}
    with _popen(cmd, env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            dump_stacks(proc)
            kill_everything(proc)
            out, err = proc.communicate()
            raise AssertionError(f"{' '.join(map(str, cmd))} still running after {timeout}s\n"
                                 f"stdout: {out[-4000:]}\nstderr (stacks): {err[-12000:]}") from None
        finally:
            kill_everything(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_cli(*args, env: dict | None = None, timeout: float = RUN_TIMEOUT, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
    """`python -m runner ARGS` to its end; returns CompletedProcess with text output."""
    return run(runner_cmd(*args), env, timeout, cwd)


def run_torchrun(*args, env: dict | None = None, timeout: float = RUN_TIMEOUT, **torchrun
                 ) -> subprocess.CompletedProcess:
    """`torchrun_cmd(*args, **torchrun)` to its end, one intra-op thread per rank; returns CompletedProcess with
    text output."""
    return run(torchrun_cmd(*args, **torchrun), {"OMP_NUM_THREADS": 1, **(env or {})}, timeout)


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state is [0], ppid [1], pgid [2], starttime [19])."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, found by parent pid in /proc (torchrun puts workers in their own sessions,
    so killing its process group would miss them)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := proc_stat(int(d.name))):
            children.setdefault(int(st[1]), []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def tagged(tag: str) -> list[int]:
    """Live (non-zombie) processes started by the launch with this tag."""
    marker = f"{TAG}={tag}".encode()
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                environ = (d / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in environ and (proc_stat(int(d.name)) or ["Z"])[0] != "Z":
                found.append(int(d.name))
    return found


def kill_everything(proc: subprocess.Popen, first: int | None = None, timeout: float = 60) -> None:
    """SIGKILL `first` (if given), then every process of the launch and their process groups (torchrun starts
    each worker in its own session, so one killpg is not enough); wait until all are gone."""
    if first is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while pids := tagged(proc.tag):
        assert time.monotonic() < deadline, f"processes survive SIGKILL: {pids}"
        for pgid in {int(st[2]) for pid in pids if (st := proc_stat(pid))}:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(1)
        else:
            time.sleep(0.05)
    proc.wait(timeout)


def train_in_process(job: Path, *overrides, capsys) -> tuple[int | str, str, str]:
    """`runner train job overrides…` in this process: (exit status, or "crash: …" for an injected crash
    (RUNNER_TEST_FAIL_AT_STEP), which propagates like a real one; stdout; stderr)."""
    from runner import cli

    try:
        code = cli.main(["train", str(job), *map(str, overrides)])
    except RuntimeError as e:
        code = f"crash: {e}"
    out = capsys.readouterr()
    return code, out.out, out.err


# --- reading results back ----------------------------------------------------------------------------------------

def table_row(text: str, first_cell: str) -> list[str]:
    """The cells of the printed table row starting with `first_cell` (cells are separated by 2+ spaces)."""
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row for {first_cell}:\n{text}")


def newest_state(ckpt_dir, storage_options: dict | None = None) -> tuple[dict, dict]:
    """(state, manifest) of the newest valid checkpoint in a store."""
    from runner.store import CheckpointStore

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


# A user dataset by import path, next to the job file: runner's synthetic data (no scikit-learn import, so
# each launch starts faster than with digits; `source: text` for runner's text data) with runner's random
# augmentation when `augment: true`, whose training set appends every index it loads to
# RECORD_DIR/rank{RANK}-pid{PID}.txt (workers included).
RECORDER = '''
import os

from torch.utils.data import Dataset

import runner.data
from runner.data import Augmented


class Recorder(Dataset):
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        folder = os.environ.get("RECORD_DIR")
        if folder:
            name = f"rank{os.environ.get('RANK', '0')}-pid{os.getpid()}.txt"
            with open(os.path.join(folder, name), "a") as f:
                f.write(f"{index}\\n")
        return self.base[index]


def build(source="synthetic", augment=False, **args):
    data = getattr(runner.data, source)(**args)
    data.train = Recorder(Augmented(data.train) if augment else data.train)
    return data
'''


def job_folder(folder: Path) -> Path:
    """`folder` with recording_data.py in it, so job files there can name `recording_data:build`."""
    (folder / "recording_data.py").write_text(RECORDER)
    return folder


def text_corpus(folder: Path, size: int) -> str:
    """A file of `size` random bytes from a 12-letter alphabet (seed 0), for the `text` dataset; its path."""
    path = folder / "corpus.txt"
    generator = torch.Generator().manual_seed(0)
    path.write_bytes(bytes((torch.randint(0, 12, (size,), generator=generator) + 97).tolist()))
    return str(path)


def consumed(record: Path, world_size: int) -> list[int]:
    """The indices a launch of RECORDER data loaded, in the global order: the ranks' k-th samples dealt
    round-robin."""
    per_rank = [[int(v) for p in sorted(record.glob(f"rank{r}-*.txt")) for v in p.read_text().split()]
                for r in range(world_size)]
    assert len({len(p) for p in per_rank}) == 1, [len(p) for p in per_rank]
    return [per_rank[r][k] for k in range(len(per_rank[0])) for r in range(world_size)]


def epoch_order(size: int, epoch: int) -> list[int]:
    """The order an uninterrupted run (seed 0, shuffled) trains the `size` samples in, on any world size."""
    from runner.data import ShardedSampler

    sampler = ShardedSampler(size, 0, 1, seed=0, shuffle=True, pad=False)
    sampler.set_epoch(epoch)
    return sampler.order()
