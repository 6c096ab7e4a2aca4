"""The progress watchdog: a rank that stops making progress becomes a restart in seconds, with its stacks, instead
of a bare timeout after dist.timeout_s (docs/design.md, "Hangs become restarts").

The loop beats after every optimizer step and evaluation batch. A thread on each rank compares the time since the
last beat with an allowance: `watchdog.step_multiple` × the running median of this rank's beat intervals for the
activity (training steps, evaluation batches), at least `watchdog.floor_s`; `watchdog.first_step_s` for start-up,
compilation and an epoch's first batch (the loader's workers start); `watchdog.save_s` while a save blocks training.
The activity comes from the launch's timers (events.Timers), which the loop already keeps. Past the allowance the
rank writes every thread's Python stack (faulthandler) to <out_dir>/hangs/, says in one line which rank hung where,
and exits HANG_EXIT, which torchrun's --max-restarts turns into a restart of the group from the last checkpoint.

A thread that cannot run at all (a C call that never releases the GIL) cannot fire: each time it wakes it re-arms
faulthandler's timer, a C thread that needs no GIL, so after `watchdog.gil_s` without a wake that timer prints
every thread's stack to stderr and exits 1 (a restart too).

Under torchrun every rank's thread also publishes its progress to the rendezvous store 4 times a second; the rank that
fires first reads the others', so a rank waiting in a collective for a peer that is stopped (SIGSTOP), gone or
behind names that peer, not itself.
"""
from __future__ import annotations

import faulthandler
import json
import os
import statistics
import threading
import time
from collections import deque
from datetime import timedelta
from pathlib import Path

from .config import WatchdogConfig
from .console import warn
from .events import EventLog

HANG_EXIT = 76  # "a rank stopped making progress; its stacks are in <out_dir>/hangs": run the same command
PUBLISH_S = 0.25  # a set on the store per rank this often (~0.1 ms): what a peer last heard is this fresh
STALE_S = 2.0  # a live peer publishes several times in this long, even on loaded cores
HANGS = "hangs"


class Watchdog:
    def __init__(self, cfg: WatchdogConfig, rank: int, world_size: int, out_dir: str, events: EventLog,
                 step: int = 0):
        self.cfg, self.rank, self.world_size, self.events = cfg, rank, world_size, events
        self.dir = Path(out_dir) / HANGS
        self.beats, self.last_beat, self.step = 0, time.monotonic(), step  # the step resumed from, until one ends
        self.slow_next = True  # start-up: the first beat gets first_step_s
        self.intervals = {"productive": deque(maxlen=200), "eval": deque(maxlen=200)}
        self.stopped = threading.Event()
        self.peers = Peers(rank, world_size) if world_size > 1 else None
        self.thread = threading.Thread(target=self._watch, name="runner-watchdog", daemon=True)
        if cfg.enabled:
            arm_gil_timer(cfg.gil_s)  # before the first step; see _watch
            self.thread.start()

    # --- the training thread ---------------------------------------------------------------------------------

    def beat(self, step: int | None = None) -> None:
        """Progress: after an optimizer step (`step`) or an evaluation batch."""
        now = time.monotonic()
        activity = self.events.timers.activity
        if not self.slow_next and activity in self.intervals:
            self.intervals[activity].append(now - self.last_beat)
        self.beats, self.last_beat, self.slow_next = self.beats + 1, now, False
        if step is not None:
            self.step = step

    def expect_slow(self) -> None:
        """The next beat may take first_step_s (an epoch's first batch, an evaluation's)."""
        self.slow_next = True
        self.last_beat = time.monotonic()

    def close(self) -> None:
        self.stopped.set()
        arm_gil_timer(None)  # and the thread disarms at its next wake, if it re-armed

    # --- the watchdog thread ---------------------------------------------------------------------------------

    def allowance(self, activity: str) -> float:
        c = self.cfg
        if self.slow_next or activity in ("other", "compile"):
            return c.first_step_s
        if activity == "stall":
            return c.save_s
        seen = self.intervals.get(activity)
        if not seen:
            return c.first_step_s
        return max(c.floor_s, c.step_multiple * statistics.median(seen))

    def _watch(self) -> None:
        while not self.stopped.wait(PUBLISH_S):
            arm_gil_timer(self.cfg.gil_s)  # fires only if this thread stops waking
            activity = self.events.timers.activity
            quiet = time.monotonic() - self.last_beat
            if self.peers is not None:
                self.peers.publish(self.step, self.beats, activity)
            if quiet > self.allowance(activity) and not self.stopped.is_set():
                self.fire(activity, quiet)
        arm_gil_timer(None)

    def fire(self, activity: str, quiet: float) -> None:
        """Stacks and one line, then exit: the process may be stuck anywhere, so nothing here waits on it."""
        waiting_for = self.peers.unresponsive(self.step) if self.peers is not None else []
        where = f"at step {self.step} ({describe(activity)}) for {quiet:.0f} s"
        if waiting_for:
            what = f"rank {self.rank} made no progress {where}: waiting for {'; '.join(waiting_for)}"
        else:
            what = f"rank {self.rank} hung {where}"
        path = self.dir / f"rank-{self.rank}-step-{self.step}-{time.strftime('%Y%m%dT%H%M%S')}.txt"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                f.write(what + "\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError as e:
            path = f"(not written: {e})"
        warn(f"{what}; every thread's stack: {path}; exiting {HANG_EXIT} so that the group restarts from the last "
             "checkpoint (torchrun --max-restarts)")
        self.events.emit("hang", step=self.step, rank=self.rank, activity=activity, quiet_s=round(quiet, 1),
                         waiting_for=waiting_for, stacks=str(path))
        os._exit(HANG_EXIT)


STDERR_FD = 2  # the process's, also where sys.stderr is replaced by an object without a file (pytest, Jupyter)
_gil_timer = threading.Lock()  # held across a fork (_before_fork)
_gil_timer_s: float | None = None


def arm_gil_timer(seconds: float | None) -> None:
    """(Re)start faulthandler's timer: stacks to stderr and exit 1 in `seconds` unless re-armed; None: stop it."""
    global _gil_timer_s
    with _gil_timer:
        _gil_timer_s = seconds
        if seconds is None:
            faulthandler.cancel_dump_traceback_later()
        else:
            faulthandler.dump_traceback_later(seconds, exit=True, file=STDERR_FD)


def _before_fork() -> None:
    """A forked child would inherit the timer armed but not its thread, and hang as it exits (CPython's faulthandler
    waits for that thread): stopped around every fork, and restarted in the parent."""
    _gil_timer.acquire()
    if _gil_timer_s is not None:
        faulthandler.cancel_dump_traceback_later()


def _after_fork_in_parent() -> None:
    if _gil_timer_s is not None:
        faulthandler.dump_traceback_later(_gil_timer_s, exit=True, file=STDERR_FD)
    _gil_timer.release()


def _after_fork_in_child() -> None:
    global _gil_timer_s
    _gil_timer_s = None
    _gil_timer.release()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


def describe(activity: str) -> str:
    return {"productive": "training", "eval": "evaluation", "stall": "a save", "compile": "compilation",
            "other": "start-up"}.get(activity, activity)


class Peers:
    """Every rank's progress in torchrun's rendezvous store (a client of its own, used by the watchdog thread
    only): each rank's step, beats and a counter bumped at each publication. A peer whose counter stands still for
    STALE_S is stopped or gone; one at a lower step is behind."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size, self.count, self.store = rank, world_size, 0, None
        self.prefix = f"runner-progress/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"

    def _store(self):
        if self.store is None:
            import torch.distributed as tdist

            self.store = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                        timeout=timedelta(seconds=5), wait_for_workers=False)
        return self.store

    def publish(self, step: int, beats: int, activity: str) -> None:
        self.count += 1
        try:
            self._store().set(f"{self.prefix}{self.rank}", json.dumps([step, beats, activity, self.count]))
        except Exception:  # noqa: BLE001 — the store gone (its host died) must not end a rank that still works
            self.store = None

    def read(self) -> dict[int, list]:
        found = {}
        for peer in range(self.world_size):
            if peer == self.rank:
                continue
            try:
                found[peer] = json.loads(self._store().get(f"{self.prefix}{peer}"))
            except Exception:  # noqa: BLE001 — never published, or the store is gone: nothing to say of it
                continue
        return found

    def unresponsive(self, step: int) -> list[str]:
        """The peers this rank is waiting for: stopped or gone (their counter still for STALE_S), or behind (at a
        lower step)."""
        before = self.read()
        time.sleep(STALE_S)
        after = self.read()
        said = []
        for peer in range(self.world_size):
            if peer == self.rank:
                continue
            if peer not in after or (peer in before and after[peer][3] == before[peer][3]):
                last = before.get(peer) or after.get(peer)
                at = f"last heard of at step {last[0]} ({describe(last[2])})" if last else "never heard from"
                said.append(f"rank {peer} ({at}; not responding: stopped, hung in C code or gone)")
            elif after[peer][0] < step:
                said.append(f"rank {peer} (at step {after[peer][0]}, {describe(after[peer][2])})")
        return said
