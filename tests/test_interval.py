"""checkpoint.every: auto (README, "The checkpoint interval, chosen"; docs/design.md, "The interval, chosen"): the
Young/Daly arithmetic and its bounds, the cost measured from a run's saves, the MTBF from its lineage's history,
and end to end: slow saves checkpoint less often than cheap ones, a run killed repeatedly more often than one never
interrupted, and `runner report` shows the interval with its inputs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from helpers import ok, run_cli, write_job
from runner.config import CheckpointConfig
from runner.errors import ConfigError
from runner.events import EventLog
from runner.interval import (AutoInterval, History, blended_mtbf, bounded, expected_loss, lineage_history,
                             young_daly)

# A tiny MLP on synthetic data: 128 steps per epoch in well under a second, so a run is a few seconds of saving
# every fraction of one (the prior MTBF is 36 s).
FAST = {
    "model": {"name": "mlp", "args": {"hidden": [256, 256]}},
    "data": {"name": "synthetic", "args": {"shape": [16], "num_classes": 4, "size": 4096, "val_size": 64},
             "batch_size": 32},
    "optim": {"name": "AdamW", "lr": 0.01},
    "train": {"max_epochs": 16, "seed": 0, "progress": "plain"},
    "checkpoint": {"every": "auto", "every_epoch": False, "mtbf_hours": 0.01, "auto_min_minutes": 0.001,
                   "keep_last": 2},
}


def records(out_dir: Path, event: str) -> list[dict]:
    lines = (out_dir / "events.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


# --- the arithmetic ----------------------------------------------------------------------------------------------

def test_young_daly_interval_minimises_the_expected_loss():
    cost, mtbf = 2.0, 3600.0
    best = young_daly(cost, mtbf)
    assert best == pytest.approx(120.0)
    assert expected_loss(best, cost, mtbf) < min(expected_loss(best * 0.8, cost, mtbf),
                                                 expected_loss(best * 1.25, cost, mtbf))
    assert expected_loss(best, cost, mtbf) == pytest.approx(2 * math.sqrt(cost / (2 * mtbf)))


@pytest.mark.parametrize("ideal, write, expected", [(120, 0, 120), (10, 0, 60), (9000, 0, 3600), (120, 500, 500),
                                                    (9000, 5000, 5000)])
def test_the_interval_is_bounded_and_never_shorter_than_the_write(ideal, write, expected):
    assert bounded(ideal, 60, 3600, write) == expected


def test_the_prior_is_one_more_interval_of_the_history():
    assert blended_mtbf(21600, 0, 0) == 21600  # no history: the prior
    assert blended_mtbf(21600, 3 * 3600, 2) == pytest.approx((3 * 3600 + 21600) / 3)
    assert blended_mtbf(3600, 100 * 3600, 99) == pytest.approx(101 * 3600 / 100)  # a long history dominates


def test_cost_is_blocked_time_plus_the_slowdown_of_steps_during_the_write(tmp_path):
    events = EventLog(tmp_path / "events.jsonl", True)
    auto = AutoInterval(CheckpointConfig(every="auto", mtbf_hours=1.0, auto_min_minutes=0.01), events, History())
    assert auto.current.interval_s == pytest.approx(0.6) and auto.current.cost_s is None  # unknown: the minimum
    productive = 0.0
    auto.step(productive, False)
    for i in range(40):  # 20 steps of 10 ms without a write in flight, 20 of 30 ms with one
        writing = i >= 20
        productive += 0.03 if writing else 0.01
        auto.step(productive, writing)
    auto.saved(blocked_s=0.1, write_s=0.5)
    chosen = auto.current
    assert chosen.slowdown_s == pytest.approx(20 * 0.02) and chosen.cost_s == pytest.approx(0.5)
    assert chosen.interval_s == pytest.approx(math.sqrt(2 * 0.5 * chosen.mtbf_s), rel=1e-3)
    assert [r["interval_s"] for r in records(tmp_path, "interval")] == [0.6, chosen.interval_s]


def test_history_counts_every_launch_that_did_not_exit_0(tmp_path):
    def line(event, t, launch, run_id="run-A", **fields):
        return json.dumps({"event": event, "time": 1e9 + t, "launch": launch, "run_id": run_id, **fields}) + "\n"

    (tmp_path / "events.jsonl").write_text("".join([
        line("start", 0, "L1", None), line("fresh", 1, "L1"), line("heartbeat", 100, "L1", step=5),  # killed
        line("checkpoint", 50, "L1", step=4, blocked_s=0.2, committed=True, emergency=False),
        line("start", 200, "L2", None), line("resume", 201, "L2", step=4), line("exit", 300, "L2", status=75),
        line("start", 400, "L3", None), line("resume", 401, "L3", step=8), line("exit", 500, "L3", status=0),
        line("start", 600, "L4", None), line("resume", 601, "L4", step=9),  # this launch
    ]))
    history = lineage_history(str(tmp_path), "run-A", "L4")
    assert (history.interruptions, history.observed_s, history.blocked_s) == (2, 300.0, [0.2])
    assert lineage_history(str(tmp_path), "run-B", "L4").interruptions == 0  # another lineage knows none of it


def test_every_auto_with_every_minutes_is_refused(tmp_path):
    from runner.config import load_config

    with pytest.raises(ConfigError, match="checkpoint.every: auto"):
        load_config(write_job(tmp_path, checkpoint={"every": "auto", "every_minutes": 5}))


# --- end to end ----------------------------------------------------------------------------------------------------

def saves_per_second(out_dir: Path) -> float:
    periodic = [r for r in records(out_dir, "checkpoint") if r["committed"] and not r["emergency"]]
    return len(periodic) / records(out_dir, "exit")[-1]["productive_s"]


@pytest.mark.slow
def test_slow_saves_checkpoint_less_often_than_cheap_ones(tmp_path):
    ok(run_cli("train", write_job(tmp_path, "cheap", base=FAST), env={"OMP_NUM_THREADS": 1}))
    ok(run_cli("train", write_job(tmp_path, "slow", base=FAST),
               env={"OMP_NUM_THREADS": 1, "RUNNER_TEST_SLOW_COMMIT_S": 1.0}))  # each write takes a second longer
    slow, cheap = records(tmp_path / "slow", "interval")[-1], records(tmp_path / "cheap", "interval")[-1]
    assert slow["write_s"] >= 1.0 and slow["interval_s"] >= slow["write_s"]  # never faster than the write goes
    # A save that waits for the write before it blocks training: that is its cost, and the interval grows with it.
    assert slow["cost_s"] > 10 * cheap["cost_s"] and slow["interval_s"] > 3 * cheap["interval_s"]
    assert saves_per_second(tmp_path / "slow") < saves_per_second(tmp_path / "cheap")
    report = ok(run_cli("report", str(tmp_path / "slow")))
    assert "checkpoint interval (every: auto): " in report and "interruption(s)" in report, report


@pytest.mark.slow
def test_a_run_killed_repeatedly_checkpoints_more_often_than_one_never_interrupted(tmp_path):
    never = write_job(tmp_path, "never", base=FAST)
    ok(run_cli("train", never, env={"OMP_NUM_THREADS": 1}))
    killed = write_job(tmp_path, "killed", base=FAST)
    for crash_at in (300, 600, 900, 1200):  # four launches that crash: each an interruption of the lineage
        crashed = run_cli("train", killed, env={"OMP_NUM_THREADS": 1, "RUNNER_TEST_FAIL_AT_STEP": crash_at})
        assert crashed.returncode == 1, crashed.stderr[-3000:]
    ok(run_cli("train", killed, env={"OMP_NUM_THREADS": 1}))
    last_launch = records(tmp_path / "killed", "start")[-1]["launch"]
    chosen = [r for r in records(tmp_path / "killed", "interval") if r["launch"] == last_launch]
    calm = records(tmp_path / "never", "interval")
    assert chosen[-1]["interruptions"] == 4 and calm[-1]["interruptions"] == 0
    assert chosen[-1]["mtbf_s"] < calm[-1]["mtbf_s"] / 3
    mean = [sum(r["interval_s"] for r in rs[1:]) / len(rs[1:]) for rs in (chosen, calm)]  # measured ones
    assert mean[0] < mean[1], (chosen, calm)
