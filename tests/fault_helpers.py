"""Helpers of the fault-tolerance tests (test_preemption.py, test_chaos.py): finding torchrun's workers, waiting
on observable progress, references, a cuttable TCP proxy. Launching and killing whole launches is in helpers.py.

Timing on a shared 2-core machine is noisy: nothing here sleeps a fixed time to "let something happen";
everything waits for a file, a log line or a process state, with generous but bounded timeouts.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

from helpers import (assert_tensors_equal, dump_stacks, launched, newest_state, proc_stat, runner_cmd, torchrun_cmd,
                     write_job)

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


# --- watching a launch -------------------------------------------------------------------------------------

def workers_by_rank(agent: int) -> dict[int, int]:
    """torchrun's worker processes (the agent's direct children), by their RANK."""
    ranks = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := proc_stat(int(d.name))) and int(st[1]) == agent:
            with contextlib.suppress(OSError):
                env = dict(v.split("=", 1) for v in (d / "environ").read_text().split("\0") if "=" in v)
                if "RANK" in env:
                    ranks[int(env["RANK"])] = int(d.name)
    return ranks


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
        dump_stacks(proc)
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
    from runner.store import CheckpointStore

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
