"""Helpers of the fault-tolerance tests (test_preemption.py, test_chaos.py): launching real runs in their own
process groups, waiting on observable progress, killing whole process trees, references, a cuttable TCP proxy.

Timing on a shared 2-core machine is noisy: nothing here sleeps a fixed time to "let something happen";
everything waits for a file, a log line or a process state, with generous but bounded timeouts.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from helpers import REPO, assert_tensors_equal, child_env, free_port, newest_state, write_job

LAUNCH_TIMEOUT = 240  # one launch, start to exit: a run takes 10-25 s here, mostly importing torch on 2 loaded cores
STEPS_1, STEPS_2 = 90, 46  # optimizer steps of JOB: 1 process (45 per epoch), 2 ranks (23 per epoch, padded)

# Dropout, BatchNorm, AdamW and a per-step scheduler: a resume that restores any of them wrongly shows up
# in the final weights. Two DataLoader workers per rank, so group-wide signals reach worker processes too.
JOB = {
    "model": {"name": "cnn", "args": {"width": 8, "dropout": 0.2}},
    "data": {"name": "digits", "batch_size": 32, "num_workers": 2},
    "optim": {"name": "AdamW", "lr": 0.01},
    "scheduler": {"name": "StepLR", "args": {"step_size": 20, "gamma": 0.5}, "interval": "step"},
    "train": {"max_epochs": 2, "seed": 0, "progress": "plain"},
    "dist": {"timeout_s": 90},  # a collective stuck by a bug fails with a traceback before LAUNCH_TIMEOUT
}
COMPARED = ("model", "optimizer", "scheduler")  # what "bit-identical" means for these tests


def seeded_rng(name: str) -> random.Random:
    """A random.Random seeded from FAULT_SEED (or a fresh seed), printed so a failure can be replayed."""
    seed = int(os.environ.get("FAULT_SEED") or random.randrange(1 << 31))
    print(f"{name}: FAULT_SEED={seed}")
    return random.Random(seed)


# --- processes ---------------------------------------------------------------------------------------------

def start(cmd: list[str], log: Path, **env) -> subprocess.Popen:
    """Popen in a new session (its own process group), stdout and stderr to `log`.

    Every process of the launch (torchrun's workers, DataLoader workers) inherits FAULT_TEST_TAG=<uuid>, so
    kill_everything finds them all, even orphans whose parent is gone; nothing else can carry that tag.
    PYTHONFAULTHANDLER: `finish` makes a launch that hangs print every thread's stack before it is killed.
    """
    tag = uuid.uuid4().hex
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                env=child_env(OMP_NUM_THREADS=1, PYTHONFAULTHANDLER=1, FAULT_TEST_TAG=tag, **env))
    proc.tag = tag
    return proc


def runner_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "runner", *map(str, args)]


def torchrun_cmd(*args, nproc: int = 2, extra: tuple = ()) -> list[str]:
    """torchrun, c10d rendezvous on a free loopback port, `--max-restarts=0` unless `extra` says otherwise."""
    restarts = () if any(str(e).startswith("--max-restarts") for e in extra) else ("--max-restarts=0",)
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}", *restarts, *extra, "-m", "runner", *map(str, args)]


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state is [0], ppid [1], pgid [2], starttime [19])."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def workers_by_rank(agent: int) -> dict[int, int]:
    """torchrun's worker processes (the agent's direct children), by their RANK."""
    ranks = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))) and int(st[1]) == agent:
            with contextlib.suppress(OSError):
                env = dict(v.split("=", 1) for v in (d / "environ").read_text().split("\0") if "=" in v)
                if "RANK" in env:
                    ranks[int(env["RANK"])] = int(d.name)
    return ranks


def tagged(tag: str) -> list[int]:
    """Live (non-zombie) processes started by the launch with this FAULT_TEST_TAG."""
    marker = f"FAULT_TEST_TAG={tag}".encode()
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "environ").read_bytes().split(b"\0") and (_stat(int(d.name)) or ["Z"])[0] != "Z":
                    found.append(int(d.name))
            except OSError:
                pass
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
        for pgid in {int(st[2]) for pid in pids if (st := _stat(pid))}:
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


@contextlib.contextmanager
def launched(cmd: list[str], log: Path, **env):
    """`start` whose whole process tree is killed on the way out, however the test ends."""
    proc = start(cmd, log, **env)
    try:
        yield proc
    finally:
        kill_everything(proc)


def text(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def wait_until(predicate, what: str, proc: subprocess.Popen | None = None, log: Path | None = None,
               timeout: float = LAUNCH_TIMEOUT, poll: float = 0.02):
    """Poll `predicate` until it returns something truthy; fail if `proc` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        tail = text(log)[-3000:] if log else ""
        assert proc is None or proc.poll() is None, f"exited {proc.returncode} before {what}\n{tail}"
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}\n{tail}"
        time.sleep(poll)


def finish(proc: subprocess.Popen, log: Path, timeout: float = LAUNCH_TIMEOUT) -> str:
    """Wait for the launch to exit; a hang fails with the stacks of its processes (SIGABRT → faulthandler)."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        for pid in tagged(proc.tag):
            if pid != proc.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGABRT)
        time.sleep(3)
        raise AssertionError(f"still running after {timeout}s; stacks in {log}\n{text(log)[-6000:]}") from None
    return text(log)


def last_step(out_dir: Path) -> int:
    """The step rank 0 reached (runner writes out_dir/last_step after every optimizer step)."""
    try:
        return int((out_dir / "last_step").read_text())
    except (OSError, ValueError):
        return 0


def resumed(output: str) -> list[tuple[str, int, int]]:
    """(checkpoint URL, step, steps lost) of every "resuming from" line."""
    return [(url, int(step), int(lost)) for url, step, lost in
            re.findall(r"resuming from (\S+): step (\d+),.*?; (\d+) step\(s\) lost", output)]


# --- references ----------------------------------------------------------------------------------------------

def reference(tmp_path_factory, nproc: int) -> Path:
    """Checkpoint dir of an uninterrupted run of JOB (1 process or 2-rank torchrun), once per pytest session.

    Cached under the session's base temp dir, so test_preemption.py and test_chaos.py share it.
    """
    folder = tmp_path_factory.getbasetemp() / f"fault-reference-{nproc}"
    ckpt = folder / "ref" / "checkpoints"
    if (folder / "done").exists():
        return ckpt
    folder.mkdir(exist_ok=True)
    job = write_job(folder, "ref", base=JOB)
    cmd = runner_cmd("train", job) if nproc == 1 else torchrun_cmd("train", job, nproc=nproc)
    log = folder / "out.txt"
    with launched(cmd, log) as proc:
        out = finish(proc, log)
    assert proc.returncode == 0, out[-3000:]
    _, manifest = newest_state(ckpt)
    assert manifest["step"] == (STEPS_1 if nproc == 1 else STEPS_2) and manifest["finished"]
    (folder / "done").touch()
    return ckpt


def assert_same_final_state(ckpt_dir, ref_dir, storage_options: dict | None = None) -> int:
    """The newest valid checkpoints are bit-identical in model, optimizer and scheduler; returns the step."""
    state, manifest = newest_state(ckpt_dir, storage_options)
    ref_state, ref_manifest = newest_state(ref_dir)
    assert manifest["step"] == ref_manifest["step"] and manifest["finished"], (manifest["step"], ref_manifest["step"])
    for section in COMPARED:
        assert_tensors_equal(state[section], ref_state[section], section)
    return manifest["step"]


def assert_store_sound(url: str, storage_options: dict | None = None) -> list:
    """Every checkpoint the cheap listing calls valid also passes full verification; returns the listing."""
    from runner.checkpoint import CheckpointStore

    store = CheckpointStore(url, storage_options)
    infos = store.list()
    for info in infos:
        if info.valid:
            checked = store.verify(info)
            assert checked.valid, f"{info.url} lists as valid but fails verification: {checked.reason}"
    return infos


# --- a TCP proxy that can be cut -----------------------------------------------------------------------------

class CuttableProxy:
    """127.0.0.1 TCP proxy to `upstream` (host, port). `cut()` closes every open connection and resets new ones
    at once (a server gone mid-upload); `restore()` forwards again. The upstream server keeps its state."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.is_cut = False
        self.lock = threading.Lock()
        self.open: set[socket.socket] = set()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if self.is_cut:
                    _reset(client)
                    continue
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                _reset(client)
                continue
            with self.lock:
                self.open |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self.lock:
            self.is_cut = True
            for s in self.open:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)  # wakes the pump threads blocked in recv
                _reset(s)
            self.open.clear()

    def restore(self) -> None:
        with self.lock:
            self.is_cut = False

    def close(self) -> None:
        self.closed = True
        self.cut()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self.listener.close()


def _reset(s: socket.socket) -> None:
    """Close with RST (linger 0), as a dead server's host would answer."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        s.close()
