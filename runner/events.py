"""<out_dir>/events.jsonl: what each launch did (start, resume, checkpoints, stops, exit), appended by rank 0.

One JSON object per line, each written with a single os.write on an O_APPEND descriptor, so a killed launch
leaves at most a torn last line; readers skip it (and any other line that does not parse). Every record has
`event`, `time` (wall clock), `launch` (one id per process start of rank 0) and `run_id` (the checkpoint
lineage, null until known) and this launch's cumulative productive_s, stall_s, eval_s and compile_s (Timers), so the
report's categories end exactly where a killed launch's last record does (README, "What a run did").
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .console import warn

EVENTS = "events.jsonl"
HEARTBEAT_S = 60.0  # the most a launch goes without a record: a kill loses at most this much from the report
COUNTED = ("productive", "stall", "eval", "compile")  # what the records carry; "other" is the rest


@dataclass
class Span:
    seconds: float = 0.0


class Timers:
    """Seconds this launch spent per activity. The time is always charged to the current activity, so the
    parts add up to the elapsed time by construction; switching costs two perf_counter calls, no host sync.

    Starts in "other" (start-up: building the job, then restoring a checkpoint or starting fresh; the report
    calls it startup); the first optimizer step switches to "productive" (EventLog.after_step); the loop wraps
    evaluation in during("eval") and the blocking part of a save in during("stall"); torch.compile's work is
    "compile" whenever it runs (compiler.CompileClock). A lock, because the checkpoint writer thread reads the
    counters for its record.
    """

    def __init__(self) -> None:
        self.totals = dict.fromkeys((*COUNTED, "other"), 0.0)
        self.activity, self.since = "other", time.perf_counter()
        self.lock = threading.Lock()

    def switch(self, activity: str) -> str:
        """Charge the time so far to the current activity, continue with `activity`; returns the previous."""
        with self.lock:
            now = time.perf_counter()
            self.totals[self.activity] += now - self.since
            previous, self.activity, self.since = self.activity, activity, now
        return previous

    @contextlib.contextmanager
    def during(self, activity: str) -> Iterator[Span]:
        """Charge the block to `activity`, then go back; the Span holds the block's seconds afterwards."""
        span, previous = Span(), self.switch(activity)
        start = self.since
        try:
            yield span
        finally:
            self.switch(previous)
            span.seconds = self.since - start

    def seconds(self, activity: str) -> float:
        """Cumulative seconds of one activity up to now (cheap: for a per-step reader)."""
        with self.lock:
            extra = time.perf_counter() - self.since if self.activity == activity else 0.0
            return self.totals[activity] + extra

    def counters(self) -> dict[str, float]:
        """Cumulative productive_s, stall_s, eval_s, compile_s up to now (the current activity included)."""
        with self.lock:
            totals = dict(self.totals)
            totals[self.activity] += time.perf_counter() - self.since
        return {f"{name}_s": round(totals[name], 6) for name in COUNTED}


class EventLog:
    """Rank 0 appends records; on other ranks (enabled=False) every call does nothing but keep the timers.

    A record that cannot be written (disk full) is reported once and the log stops: it never stops training.
    """

    def __init__(self, path: str | Path, enabled: bool, timers: Timers | None = None):
        self.path, self.enabled = Path(path), enabled
        self.timers = timers or Timers()
        self.launch = uuid.uuid4().hex
        self.run_id: str | None = None  # set once the lineage is known (fresh start or resume)
        self.step: int | None = None  # the last step a record or after_step named, for the exit record
        self.fd: int | None = None
        self.last_record = time.monotonic()
        self.first_step_done = False

    def emit(self, event: str, **fields) -> None:
        if "step" in fields:
            self.step = fields["step"]
        if not self.enabled:
            return
        record = {"event": event, "time": time.time(), "launch": self.launch, "run_id": self.run_id, **fields,
                  **self.timers.counters()}
        line = json.dumps(record, default=str) + "\n"
        try:
            if self.fd is None:
                self.fd = self.open()
                if self.torn_tail():  # a killed launch's torn line must not swallow our first record
                    line = "\n" + line
            os.write(self.fd, line.encode())
        except OSError as e:
            warn(f"cannot write {self.path} ({e.strerror or e}); no more events are recorded for this launch")
            self.enabled = False
        self.last_record = time.monotonic()

    def after_step(self, step: int) -> None:
        """Call after every optimizer step (cheap): the first one records first_step and starts the productive
        clock, later ones a heartbeat when due."""
        self.step = step
        if not self.first_step_done:
            self.first_step_done = True
            self.timers.switch("productive")
            self.emit("first_step", step=step)
        else:
            self.maybe_heartbeat(step)

    def maybe_heartbeat(self, step: int) -> None:
        """A heartbeat when HEARTBEAT_S passed since the last record: a killed launch's time is known up to it."""
        if self.enabled and time.monotonic() - self.last_record >= HEARTBEAT_S:
            self.emit("heartbeat", step=step)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def torn_tail(self) -> bool:
        with open(self.path, "rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"


def json_lines(text: str) -> Iterator[dict]:
    """The JSON objects of a .jsonl text, in order; a torn or unparsable line is skipped."""
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            yield record


def read_events(path: str | Path) -> list[dict]:
    """Every complete record, in file order; a torn or unparsable line is skipped, a missing file is empty."""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [r for r in json_lines(text) if isinstance(r.get("event"), str) and "launch" in r]
