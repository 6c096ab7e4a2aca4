"""Stop signals → a stop request that all ranks agree on (StopAgreement), one step later, at a step boundary.

The handler only records the signal (in this module's globals: a signal handler has nowhere else to write);
the loop then saves a checkpoint of the step it reached and exits with PREEMPTED_EXIT. A cloud preemption notice
(`NoticeStop`, on a thread) takes the same path.

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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from . import notices
from .config import PreemptionConfig
from .console import log, warn
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
    warn(f"{name} arrived {grace_s + WATCHDOG_MARGIN_S:g}s ago and no emergency checkpoint was committed within "
         f"preemption.grace_s={grace_s:g}: this process is stuck (a step, a collective waiting for a lost or hung "
         f"peer, or a write); exiting with status {EMERGENCY_SAVE_FAILED_EXIT}. The next start resumes from the newest "
         "committed checkpoint.")
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

    def after_step(self, save_now: bool = False, broken: bool = False, settle: bool = False) -> Decision:
        """This rank's flags (a stop requested here, `save_now`, `broken`) in, the ranks' agreement on the previous
        call's flags out (with `settle`, on this call's too). An agreed stop leaves nothing in flight, and one from a
        cloud notice stops this node's launcher too."""
        decision = self._agree(requested() is not None, save_now, broken, _notice is not None, settle=settle)
        if decision.stop:
            if decision.final:
                stop_launcher()  # every node's agent, not only the one whose VM got the notice
            self.settle()
        return decision

    def stop_agreed(self, settle: bool) -> bool:
        """Outside the steps (an epoch's first batch, evaluation): whether some rank got a stop request, agreed
        as after a step."""
        return self.after_step(settle=settle).stop

    def _agree(self, *flags: bool, settle: bool) -> Decision:
        if self.group is None:
            return Decision(*flags)
        agreed = self._finish()
        sent = torch.tensor(flags, dtype=torch.int32)
        self.pending = (tdist.all_reduce(sent, tdist.ReduceOp.MAX, group=self.group, async_op=True), sent)
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


def stop_launcher() -> None:
    """Under torchrun, local rank 0 sends SIGTERM to its agent: the agent forwards it to every local worker and does
    not restart them (workers exiting 75 without it would be restarted by --max-restarts, on a VM about to go)."""
    if "TORCHELASTIC_RUN_ID" in os.environ and os.environ.get("LOCAL_RANK") == "0":
        os.kill(os.getppid(), signal.SIGTERM)


class NoticeStop:
    """Local rank 0 of every node watches its cloud's preemption notice on a thread (off-cloud nothing is sent:
    notices.detect decides from local evidence). A notice takes the signal's path: all ranks stop at the same step,
    commit it and exit 75; then `acknowledge` lets the VM go at once (Azure). `last_save_s` says how long the last
    checkpoint took, to warn when the notice leaves less time than that."""

    def __init__(self, p: PreemptionConfig, events, last_save_s: Callable[[], float | None]):
        self.events, self.last_save_s, self.watcher = events, last_save_s, None
        if os.environ.get("LOCAL_RANK", "0") != "0":
            return
        provider = notices.detect(p.notice, notices.resolve_metadata_url(p.metadata_url), poll_s=p.notice_poll_s)
        if provider is not None:
            log(f"watching {provider.name} preemption notices at {provider.base}")
            self.watcher = notices.NoticeWatcher(provider, self._on_notice, p.notice_poll_s).start()

    def _on_notice(self, notice: notices.Notice) -> None:
        left = notice.seconds_left()
        warn(f"{notice.describe()}: committing the step reached and stopping")
        last = self.last_save_s()
        if last is not None and last > left:
            warn(f"the last checkpoint took {last:.1f}s, more than the {left:.0f}s left before the deadline: the "
                 "emergency checkpoint may not be committed in time")
        self.events.emit("notice", provider=notice.provider, action=notice.action, deadline=notice.deadline,
                         event_id=notice.event_id)
        request_stop(f"{notice.provider} preemption notice", notice.monotonic_deadline())
        stop_launcher()

    def acknowledge(self, status: int) -> None:
        """After the emergency save: a notice whose step is committed (exit 75) is acknowledged."""
        notice = self.watcher.notice if self.watcher is not None else None
        if notice is not None and status == PREEMPTED_EXIT:
            self.watcher.provider.acknowledge(notice)
            self.events.emit("notice_acknowledged", provider=notice.provider, event_id=notice.event_id)

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop(timeout=0)
