"""`runner report`: where the wall time of a run went, launch by launch, from <out_dir>/events.jsonl.

A launch is one process start of rank 0 (a torchrun restart is a new launch). Only the current lineage
counts: the run id of the newest launch that knows one. A launch that exited without learning a run id was
refused (the lease, config drift, a bad config) and trained nothing: it is listed apart, never counted. Per
launch, by construction,
    wall = startup + productive + recompute + stall + eval + compile + other
and the run's elapsed time is the sum of walls and gaps. The categories are defined in the README,
"What a run did".

startup is the launch's start record to the end of its first optimizer step, whatever the launch did there, less
the compiler's time in it (compile is its own part, before the first step and after). What
it did is the launch's `start`: "resumed" (a `resume` record: the start-up restored a checkpoint), "fresh" (a
`fresh` record: a new run, nothing restored; building the job, probing the store, loading `model.init_from` if
set) or None (killed before it decided). `restore_s` names that same start-up for a launch that resumed and is
None for any other, so it is not one more part of the wall: startup_s is. The totals' restore_s is the start-up of
the launches that resumed, a part of their startup_s.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ConfigError
from .events import EVENTS, read_events

SUMMED = ("gap_s", "wall_s", "startup_s", "productive_s", "recompute_s", "stall_s", "eval_s", "compile_s",
          "other_s")


@dataclass
class LaunchReport:
    launch: str
    started: float                 # wall clock of its start record
    host: str | None
    world_size: int | None
    restart: int | None            # TORCHELASTIC_RESTART_COUNT of the launch
    status: int | None             # its exit status; None: killed (no exit record)
    stop_reason: str | None        # the stop it was asked for (signal or notice), if any
    start: str | None              # "resumed", "fresh", or None: killed before it decided
    resumed_from: int | None       # the step it resumed from; None: a fresh start (or killed before deciding)
    lost_steps: int                # steps trained since that checkpoint by the launches before, done again
    final_step: int | None
    gap_s: float
    wall_s: float
    startup_s: float               # start to the end of the first optimizer step (every launch), less compile_s
    restore_s: float | None        # = startup_s for a launch that resumed; None otherwise (not a part of wall)
    productive_s: float
    recompute_s: float
    stall_s: float
    eval_s: float
    compile_s: float               # torch.compile at work (train.compile), wherever it ran
    other_s: float
    effective_ratio: float         # productive ÷ (gap + wall)

    @property
    def outcome(self) -> str:
        stopped = f"stopped ({self.stop_reason}), " if self.stop_reason else ""
        return f"{stopped}exit {self.status}" if self.status is not None else f"{stopped}killed"


@dataclass
class Refused:
    """A launch that exited before it joined a lineage: it trained nothing."""
    launch: str
    started: float
    host: str | None
    status: int | None             # its exit status: 2 (the lease, config drift, a bad config), 143 (SIGTERM), …


@dataclass
class Report:
    run_id: str | None
    launches: list[LaunchReport]
    refused: list[Refused] = field(default_factory=list)
    interval: dict | None = None  # checkpoint.every: auto — the lineage's last `interval` record (its inputs)

    def totals(self) -> dict:
        sums = {key: round(sum(getattr(launch, key) for launch in self.launches), 3) for key in SUMMED}
        elapsed = sums["gap_s"] + sums["wall_s"]
        steps = [launch.final_step for launch in self.launches if launch.final_step is not None]
        restore = round(sum(launch.restore_s for launch in self.launches if launch.restore_s is not None), 3)
        return {"launches": len(self.launches), **sums, "restore_s": restore, "elapsed_s": round(elapsed, 3),
                "effective_ratio": ratio(sums["productive_s"], elapsed),
                "lost_steps": sum(launch.lost_steps for launch in self.launches),
                "final_step": steps[-1] if steps else None, "refused": len(self.refused)}

    def to_json(self) -> dict:
        return {"run_id": self.run_id, "launches": [asdict(launch) for launch in self.launches],
                "refused": [asdict(launch) for launch in self.refused], "totals": self.totals(),
                "interval": self.interval}


def run_dir(run_dir_or_job: str) -> Path:
    """An out_dir as given, or the out_dir of a job YAML."""
    path = Path(run_dir_or_job)
    if path.is_file():
        from .config import load_config

        return Path(load_config(path).out_dir)
    return path


def load_events(out_dir: Path) -> list[dict]:
    path = out_dir / EVENTS
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; give a run's out_dir or its job YAML")
    records = read_events(path)
    if not records:
        raise ConfigError(f"{path}: no complete event records in it")
    return records


def launches_of(records: list[dict]) -> list[list[dict]]:
    """Every launch (its records), in start order."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(str(record["launch"]), []).append(record)
    return sorted(groups.values(), key=start_time)


def refused(launch: list[dict]) -> bool:
    """Exited without learning a run id: refused (the lease, config drift, a bad config), trained nothing."""
    return run_id_of(launch) is None and first_of(launch, "exit") is not None


def lineage_launches(every_launch: list[list[dict]]) -> tuple[str | None, list[list[dict]]]:
    """The current run id and its launches, of `every_launch` (launches_of's); refused launches are not among
    them. A launch killed before it learnt its run id belongs to the run if it started after the run's first
    launch."""
    launches = [launch for launch in every_launch if not refused(launch)]
    ids = [run_id_of(launch) for launch in launches]
    known = [run_id for run_id in ids if run_id is not None]
    if not known:
        return None, launches
    current = known[-1]
    first = ids.index(current)
    return current, [launch for i, launch in enumerate(launches)
                     if ids[i] == current or (ids[i] is None and i > first)]


def build_report(records: list[dict]) -> Report:
    every_launch = launches_of(records)
    run_id, launches = lineage_launches(every_launch)
    reports, previous_end = [], None
    for launch in launches:
        report = launch_report(launch, previous_end)
        previous_end = report.started + report.wall_s
        reports.append(report)
    intervals = [r for launch in launches for r in launch if r["event"] == "interval"]
    return Report(run_id, reports, [refused_report(launch) for launch in every_launch if refused(launch)],
                  max(intervals, key=lambda r: r["time"]) if intervals else None)


def refused_report(records: list[dict]) -> Refused:
    start, exit_ = first_of(records, "start") or {}, first_of(records, "exit")
    return Refused(str(records[0]["launch"]), start_time(records), start.get("host"), exit_.get("status"))


def launch_report(records: list[dict], previous_end: float | None) -> LaunchReport:
    start = first_of(records, "start") or {}
    exit_ = first_of(records, "exit")
    first_step = first_of(records, "first_step")
    resume = first_of(records, "resume")
    start_kind = "resumed" if resume else "fresh" if first_of(records, "fresh") else None
    stop = first_of(records, "stop_request")
    started = start_time(records)
    wall = (exit_["time"] if exit_ else max(r["time"] for r in records)) - started
    steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
    final_step = max(steps) if steps else None
    with_counters = [r for r in records if "productive_s" in r]
    counters = max(with_counters, key=lambda r: r["time"]) if with_counters else {}
    training = float(counters.get("productive_s", 0.0))  # from the first step's end: startup has the first step
    stall, evaluation = float(counters.get("stall_s", 0.0)), float(counters.get("eval_s", 0.0))
    compiling = float(counters.get("compile_s", 0.0))
    resumed_from = resume["step"] if resume else None
    lost = int(resume.get("lost", 0)) if resume else 0
    recompute = 0.0
    if first_step and final_step is not None and final_step > first_step["step"]:
        timed = final_step - first_step["step"]  # the steps whose time `training` holds
        redone = min(max(lost - (first_step["step"] - (resumed_from or 0)), 0), timed)
        recompute = training * redone / timed
    startup = (first_step["time"] - started - float(first_step.get("compile_s", 0.0)) if first_step
               else wall - compiling)
    gap = max(started - previous_end, 0.0) if previous_end is not None else 0.0  # clamped: clocks of two hosts
    productive = training - recompute
    return LaunchReport(
        launch=str(records[0]["launch"]), started=started, host=start.get("host"),
        world_size=start.get("world_size"), restart=start.get("restart"),
        status=exit_.get("status") if exit_ else None, stop_reason=stop.get("reason") if stop else None,
        start=start_kind, resumed_from=resumed_from, lost_steps=lost, final_step=final_step,
        gap_s=round(gap, 3), wall_s=round(wall, 3), startup_s=round(startup, 3),
        restore_s=round(startup, 3) if resume else None,
        productive_s=round(productive, 3), recompute_s=round(recompute, 3), stall_s=round(stall, 3),
        eval_s=round(evaluation, 3), compile_s=round(compiling, 3),
        other_s=round(wall - startup - training - stall - evaluation - compiling, 3),
        effective_ratio=ratio(productive, gap + wall))


def first_of(records: list[dict], event: str) -> dict | None:
    return next((r for r in records if r["event"] == event), None)


def start_time(records: list[dict]) -> float:
    start = first_of(records, "start")
    return start["time"] if start else min(r["time"] for r in records)


def run_id_of(records: list[dict]) -> str | None:
    return next((r["run_id"] for r in records if r.get("run_id")), None)


def ratio(part: float, whole: float) -> float:
    return round(part / whole, 4) if whole > 0 else 0.0


def duration(seconds: float) -> str:
    sign, seconds = ("-" if seconds < 0 else ""), abs(seconds)
    if seconds == 0:
        return "0s"
    if seconds < 10:
        return f"{sign}{seconds:.2f}s"
    if seconds < 60:
        return f"{sign}{seconds:.1f}s"
    if seconds < 3600:
        return f"{sign}{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{sign}{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


COLUMNS = ("#", "started (UTC)", "world", "start", "steps", "lost", "outcome", "gap", "wall", "startup",
           "productive", "recompute", "stall", "eval", "compile", "other", "ratio")


def format_report(report: Report, out_dir: Path) -> str:
    totals = report.totals()
    rows = [COLUMNS]
    for i, launch in enumerate(report.launches, 1):
        steps = f"{launch.resumed_from or 0}→{'?' if launch.final_step is None else launch.final_step}"
        rows.append((str(i), time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(launch.started)),
                     str(launch.world_size or "?"), launch.start or "?", steps, str(launch.lost_steps),
                     launch.outcome,
                     *(duration(getattr(launch, key)) for key in SUMMED), f"{launch.effective_ratio:.1%}"))
    rows.append(("total", "", "", "", f"→{totals['final_step']}", str(totals["lost_steps"]), "",
                 *(duration(totals[key]) for key in SUMMED), f"{totals['effective_ratio']:.1%}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    left = {0, 1, 3, 4, 6}  # text columns; numbers align right
    lines = ["  ".join(cell.ljust(w) if i in left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             .rstrip() for row in rows]
    head = (f"run {report.run_id or '(unknown)'} in {out_dir}: {totals['launches']} launch(es), "
            f"{totals['lost_steps']} step(s) lost to kills, final step {totals['final_step']}, "
            f"{duration(totals['elapsed_s'])} elapsed" + (f", {len(report.refused)} refused launch(es) not counted"
                                                          if report.refused else ""))
    refused = [f"refused (trained nothing, not counted): {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(r.started))}"
               f" on {r.host or '?'}, exit {r.status}" for r in report.refused]
    foot = ("startup = start to the first step's end, compile aside (restoring the checkpoint if resumed); "
            "ratio = productive ÷ (gap + wall); categories: README, \"What a run did\"")
    return "\n".join([head, *lines, *refused, *interval_lines(report, totals), foot])


def interval_lines(report: Report, totals: dict) -> list[str]:
    """checkpoint.every: auto — the interval in force, what it was chosen from, and the loss it expects next to
    the loss measured (stall + recompute over the elapsed time)."""
    chosen = report.interval
    if chosen is None:
        return []
    cost = "not measured yet" if chosen["cost_s"] is None else (
        f"{duration(chosen['cost_s'])} (blocked {duration(chosen['blocked_s'])} + slowdown "
        f"{duration(chosen['slowdown_s'] or 0.0)})")
    expected = "?" if chosen["expected_loss"] is None else f"{chosen['expected_loss']:.2%}"
    measured = ratio(totals["stall_s"] + totals["recompute_s"], totals["elapsed_s"])
    return [f"checkpoint interval (every: auto): {duration(chosen['interval_s'])} in force; save cost C {cost}; "
            f"MTBF M {duration(chosen['mtbf_s'])} (prior {duration(chosen['prior_mtbf_s'])}, "
            f"{chosen['interruptions']} interruption(s) in {duration(chosen['observed_s'])}); time lost to saves "
            f"and recompute: expected {expected}, measured {measured:.2%}"]


def report_command(run_dir_or_job: str, as_json: bool) -> str:
    out_dir = run_dir(run_dir_or_job)
    report = build_report(load_events(out_dir))
    if as_json:
        return json.dumps({"out_dir": str(out_dir), **report.to_json()}, indent=2)
    return format_report(report, out_dir)
