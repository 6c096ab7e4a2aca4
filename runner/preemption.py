"""Stop signals → a stop request that all ranks agree on (StopAgreement), one step later, at a step boundary.

The handler only records the signal (the one piece of module-level mutable state in runner); the loop
then saves a checkpoint of the step it reached and exits with PREEMPTED_EXIT.

A Python signal handler runs only when the main thread runs Python code. A rank blocked in a collective
(a peer is gone or hung) would never get there, and its launcher would SIGKILL it without a word. So the
C-level handler also wakes a watchdog thread (signal.set_wakeup_fd): if the process still runs
`grace_s + WATCHDOG_MARGIN_S` after the signal, the watchdog says so and exits EMERGENCY_SAVE_FAILED_EXIT.
"""
from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from .errors import ConfigError

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "stopped on request with a checkpoint; run the same command to resume"
EMERGENCY_SAVE_FAILED_EXIT = 3
WATCHDOG_MARGIN_S = 2.0  # the loop's own grace accounting ends first and says what happened

_requested: str | None = None
_since: float | None = None  # time.monotonic() when the first stop signal arrived
_agreed: float | None = None  # the deadline all ranks agreed on (set_deadline), which replaces grace-from-signal
_notice: float | None = None  # a cloud notice's deadline (request_stop), which replaces grace-from-signal
_wakeup_w: int | None = None  # the watchdog's wakeup pipe, so a notice arms it as a signal does


@dataclass
class Installed:
    handlers: dict
    wakeup_fd: int = -1  # the wakeup fd that was set before install
    pipe_w: int | None = None  # closing it stops the watchdog


def install(extra_signal: str | None, grace_s: float | None = None) -> Installed:
    """Catch SIGTERM, SIGINT and the configured extra signal (default SIGUSR1); with `grace_s`, start the
    watchdog that ends the process if it is still running that long after a stop signal."""
    global _requested, _since, _agreed, _notice, _wakeup_w
    _requested, _since, _agreed, _notice = None, None, None, None
    names = ["SIGTERM", "SIGINT"] + ([extra_signal] if extra_signal else [])
    sigs = [getattr(signal, name, None) for name in names]
    for name, sig in zip(names, sigs):
        if not isinstance(sig, signal.Signals):
            raise ConfigError(f"preemption.extra_signal: unknown signal '{name}' (e.g. SIGUSR1, SIGUSR2)")
    installed = Installed({sig: signal.signal(sig, _record) for sig in sigs})
    if grace_s is not None:
        pipe_r, installed.pipe_w = os.pipe()
        os.set_blocking(installed.pipe_w, False)
        installed.wakeup_fd = signal.set_wakeup_fd(installed.pipe_w)
        _wakeup_w = installed.pipe_w
        threading.Thread(target=_watchdog, args=(pipe_r, {int(s) for s in sigs}, grace_s), daemon=True,
                         name="runner-preemption-watchdog").start()
    return installed


def uninstall(installed: Installed) -> None:
    global _wakeup_w
    _wakeup_w = None
    for sig, handler in installed.handlers.items():
        signal.signal(sig, handler)
    if installed.pipe_w is not None:
        signal.set_wakeup_fd(installed.wakeup_fd)
        os.close(installed.pipe_w)  # the watchdog reads EOF and ends without firing


def _record(signum, _frame) -> None:
    global _requested
    _mark_time()
    if _requested is None:  # the first reason is the one reported (a notice, then torchrun's forwarded SIGTERM)
        _requested = signal.Signals(signum).name


def _mark_time() -> None:
    global _since
    if _since is None:
        _since = time.monotonic()


def request_stop(reason: str, deadline_at: float) -> None:
    """A stop that is not a signal — a cloud preemption notice — taking the signal's path: the loop agrees on it,
    commits the step reached and exits 75. `deadline_at` (time.monotonic()) is the notice's, not grace_s."""
    global _requested, _notice
    _mark_time()
    _notice = deadline_at
    if _requested is None:
        _requested = reason
    if _wakeup_w is not None:
        with contextlib.suppress(OSError):
            os.write(_wakeup_w, bytes([signal.SIGTERM]))  # the watchdog arms as for a signal


def requested() -> str | None:
    """Name of the stop signal received by this process, if any."""
    return _requested


def deadline(grace_s: float) -> float:
    """time.monotonic() by which the emergency checkpoint must be committed: the agreed deadline, else grace_s
    after the signal (or from now, when the stop was agreed because another rank got it)."""
    if _agreed is not None:
        return _agreed
    if _notice is not None:
        return _notice
    return (_since if _since is not None else time.monotonic()) + grace_s


def set_deadline(when: float) -> float:
    """Adopt the deadline all ranks agreed on (the watchdog follows it too); returns it."""
    global _agreed
    _agreed = when
    return when


def _watchdog(pipe_r: int, stop_signals: set[int], grace_s: float) -> None:
    """Wait for a stop signal's byte on the wakeup pipe, then for the deadline; EOF (uninstall) ends it."""
    try:
        while True:  # other signals with Python handlers (e.g. the DataLoader's SIGCHLD) write bytes too
            data = os.read(pipe_r, 512)
            if not data:
                return
            if stop_signals & set(data):
                break
        _mark_time()
        name = signal.Signals(next(b for b in data if b in stop_signals)).name
        while (left := deadline(grace_s) + WATCHDOG_MARGIN_S - time.monotonic()) > 0:
            if select.select([pipe_r], [], [], left)[0] and not os.read(pipe_r, 512):
                return
    finally:
        os.close(pipe_r)
    rank = os.environ.get("RANK")
    tag = f"rank {rank}: " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    print(f"[runner] WARNING: {tag}{name} arrived {grace_s + WATCHDOG_MARGIN_S:g}s ago and no emergency "
          f"checkpoint was committed within preemption.grace_s={grace_s:g}: this process is stuck (a step, "
          "a collective waiting for a lost or hung peer, or a write); exiting with status "
          f"{EMERGENCY_SAVE_FAILED_EXIT}. The next start resumes from the newest committed checkpoint.",
          file=sys.stderr, flush=True)
    os._exit(EMERGENCY_SAVE_FAILED_EXIT)


@dataclass(frozen=True)
class Decision:
    stop: bool = False      # a stop signal on some rank: commit the step reached and exit
    save_now: bool = False  # the wall-time cadence is due on some rank
    broken: bool = False    # saving cannot work any more on rank 0 (fenced out, a permanent storage fault)
    final: bool = False     # the stop comes from a cloud notice: no launcher may restart this launch


class StopAgreement:
    """How ranks agree on control flow — stop (a signal on any rank), save now (wall-time cadence), saving
    broken — without a blocking collective per step.

    The flags of step k travel in an all-reduce (MAX) on a CPU gloo group while step k+1 computes; every rank
    acts on them after step k+1, so all ranks still stop at the same step (one step after the signal was
    seen). At an epoch's last step, and on max_steps, `after_step(settle=True)` waits for the flags in flight
    too, so nothing crosses an epoch boundary. A single process decides at once.
    """

    def __init__(self, env):
        self.env = env
        self.group = tdist.new_group(backend="gloo") if env.distributed else None
        self.pending = None  # (work, flags tensor) of the last step

    def after_step(self, stop: bool, save_now: bool, broken: bool, settle: bool = False) -> Decision:
        final = _notice is not None
        if self.group is None:
            return Decision(stop, save_now, broken, final)
        agreed = self._finish()
        flags = torch.tensor([stop, save_now, broken, final], dtype=torch.int32)
        self.pending = (tdist.all_reduce(flags, tdist.ReduceOp.MAX, group=self.group, async_op=True), flags)
        return _either(agreed, self._finish()) if settle else agreed

    def settle(self) -> None:
        """Wait for the flags in flight (before a stop, so nothing is left pending)."""
        self._finish()

    def _finish(self) -> Decision:
        if self.pending is None:
            return Decision()
        work, flags = self.pending
        self.pending = None
        work.wait()
        return Decision(*(bool(v) for v in flags.tolist()))

    def deadline(self, grace_s: float) -> float:
        """The emergency deadline, agreed: the smallest seconds left on any rank (monotonic clocks cannot be
        compared across nodes), so no rank gives up while rank 0 is still committing; the watchdog follows it."""
        now = time.monotonic()
        left = deadline(grace_s) - now
        if self.group is not None:
            t = torch.tensor([left], dtype=torch.float64)
            tdist.all_reduce(t, tdist.ReduceOp.MIN, group=self.group)
            left = t.item()
        return set_deadline(now + left)


def _either(a: Decision, b: Decision) -> Decision:
    return Decision(a.stop or b.stop, a.save_now or b.save_now, a.broken or b.broken, a.final or b.final)
