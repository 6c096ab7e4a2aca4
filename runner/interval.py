"""checkpoint.every: auto — the save interval chosen from measured costs (docs/design.md, "The interval, chosen").

Young/Daly: saving every T seconds costs C/T of the time (C: what one save costs training) and an interruption
loses T/2 on average, once every M seconds; the sum C/T + T/(2M) is least at T = √(2·C·M).
  C  the run's own saves: seconds training was blocked (the snapshot copy) plus the slowdown of the steps that ran
     while the write was in flight (their mean time over the mean time of other steps, times their number);
     before this launch's first save, the lineage's earlier saves (events.jsonl), else unknown (then T is the
     minimum, so that the first save measures it).
  M  the lineage's history: launches ended by a kill, a crash, a signal or a notice, over the wall time of all its
     launches, blended with the prior checkpoint.mtbf_hours as one more interval: M = (time + prior) / (n + 1).
T is bounded by checkpoint.auto_min_minutes and auto_max_minutes, and never shorter than the last write took (a
save never waits for the one before). Rank 0 chooses (the other ranks vote no save; the agreement ORs the votes).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .config import CheckpointConfig
from .events import EVENTS, EventLog

CHANGE = 0.05  # a new interval is an event when it differs from the one in force by more than this fraction


def young_daly(cost_s: float, mtbf_s: float) -> float:
    return math.sqrt(2 * cost_s * mtbf_s)


def bounded(interval_s: float, low_s: float, high_s: float, write_s: float) -> float:
    """Within [low, high], then never below the write's own duration."""
    return max(min(max(interval_s, low_s), high_s), write_s)


def expected_loss(interval_s: float, cost_s: float, mtbf_s: float) -> float:
    """The fraction of the time lost to saves plus recomputation at this interval."""
    return cost_s / interval_s + interval_s / (2 * mtbf_s)


def rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 6)


def blended_mtbf(prior_s: float, observed_s: float, interruptions: int) -> float:
    return (observed_s + prior_s) / (interruptions + 1)


@dataclass
class History:
    """What earlier launches of the lineage say: interruptions, their wall time, their saves' blocked seconds."""
    interruptions: int = 0
    observed_s: float = 0.0
    blocked_s: list[float] | None = None


def lineage_history(out_dir: str, run_id: str | None, launch: str) -> History:
    """From <out_dir>/events.jsonl: the launches of run `run_id` before this one (`launch`). A launch that did not
    exit 0 was interrupted (killed: no exit record; crashed; stopped by a signal or notice: 75 or 128+n). A new
    machine without the file knows no history: the prior alone."""
    from .events import read_events
    from .report import build_report

    path = Path(out_dir) / EVENTS
    if run_id is None or not path.is_file():
        return History()
    records = read_events(path)
    report = build_report(records)
    if report.run_id != run_id:
        return History()
    earlier = [one for one in report.launches if one.launch != launch]
    saves = [r["blocked_s"] for r in records if r["event"] == "checkpoint" and r.get("run_id") == run_id
             and r.get("committed") and not r.get("emergency") and r["launch"] != launch]
    return History(sum(1 for one in earlier if one.status != 0), sum(one.wall_s for one in earlier), saves)


@dataclass
class Choice:
    """An interval and what it was chosen from: the event record's fields."""
    interval_s: float
    cost_s: float | None
    blocked_s: float | None
    slowdown_s: float | None
    write_s: float
    mtbf_s: float
    prior_mtbf_s: float
    interruptions: int
    observed_s: float
    expected_loss: float | None


class AutoInterval:
    """Rank 0's running measurements and the interval they give."""

    def __init__(self, cfg: CheckpointConfig, events: EventLog, history: History):
        self.low_s, self.high_s = cfg.auto_min_minutes * 60, cfg.auto_max_minutes * 60
        self.prior_s, self.events, self.history = cfg.mtbf_hours * 3600, events, history
        self.started = time.monotonic()
        self.blocked = list(history.blocked_s or [])[-10:]  # the latest saves count
        self.write_s = 0.0
        self.steps = {True: [0, 0.0], False: [0, 0.0]}  # writing → [steps, productive seconds]
        self.saves = 0
        self.last_productive: float | None = None
        self.current: Choice | None = None
        self.choose()

    def step(self, productive_s: float, writing: bool) -> None:
        """After each optimizer step: the productive seconds since the last one (the timers leave out stalls,
        evaluation and compilation), counted as a step with a write in flight or without."""
        if self.last_productive is not None:
            bucket = self.steps[writing]
            bucket[0] += 1
            bucket[1] += productive_s - self.last_productive
        self.last_productive = productive_s

    def saved(self, blocked_s: float, write_s: float) -> None:
        """A committed periodic save: its blocked and write seconds; the interval is chosen again."""
        self.blocked = [*self.blocked, blocked_s][-10:]
        self.write_s = write_s
        self.saves += 1
        self.choose()

    def slowdown_s(self) -> float | None:
        """Per save: how much longer the steps during its write took than the others."""
        (busy, busy_s), (idle, idle_s) = self.steps[True], self.steps[False]
        if not (busy and idle and self.saves):
            return None
        return max(busy_s / busy - idle_s / idle, 0.0) * busy / self.saves

    def choose(self) -> Choice:
        blocked = sum(self.blocked) / len(self.blocked) if self.blocked else None
        slowdown = self.slowdown_s()
        cost = None if blocked is None else blocked + (slowdown or 0.0)
        observed = self.history.observed_s + time.monotonic() - self.started
        mtbf = blended_mtbf(self.prior_s, observed, self.history.interruptions)
        ideal = young_daly(cost, mtbf) if cost else 0.0  # unknown cost: the minimum, so a save measures it
        interval = bounded(ideal, self.low_s, self.high_s, self.write_s)
        choice = Choice(round(interval, 3), rounded(cost), rounded(blocked), rounded(slowdown), round(self.write_s, 3),
                        round(mtbf, 1),
                        self.prior_s, self.history.interruptions, round(observed, 1),
                        round(expected_loss(interval, cost, mtbf), 6) if cost else None)
        if self.current is None or abs(interval - self.current.interval_s) > CHANGE * self.current.interval_s:
            self.current = choice
            self.events.emit("interval", **asdict(choice))
        return self.current

    def due(self, since_last_save_s: float) -> bool:
        return since_last_save_s >= self.current.interval_s
