"""events.jsonl, `runner report` and `runner plot`: where a run's time went across its launches, and its curves."""
import json
import math
import sys
import time

import numpy as np
import pytest

from runner import events as events_module
from runner.cli import main
from runner.events import EventLog, Timers, read_events
from runner.plot import marks
from runner.report import build_report, load_events
from helpers import write_job

T0 = 1_700_000_000.0


def record(event, t, launch, run_id="run-B", **fields):
    return json.dumps({"event": event, "time": T0 + t, "launch": launch, "run_id": run_id, **fields}) + "\n"


def counters(productive, stall, evaluation):
    return {"productive_s": productive, "stall_s": stall, "eval_s": evaluation}


# An older lineage (run-A), then run-B over three launches:
#   L1 fresh, trains to step 100 by its last heartbeat, SIGKILLed while writing a line (torn); the next start
#      finds 120 steps reached and step 80 committed: 40 steps lost.
#   L2 resumes at 80 (lost 40), SIGTERM at step 150, emergency checkpoint, exit 75.
#   L3 resumes at 150, trains to 300, exit 0.
LINES = [
    record("start", 0, "L0", None, world_size=1, restart=0),
    record("fresh", 1, "L0", "run-A"),
    record("exit", 50, "L0", "run-A", status=0, step=40, **counters(45, 0, 0)),
    record("start", 1000, "L1", None, world_size=2, host="a", restart=0),
    record("fresh", 1002, "L1", **counters(0, 0, 0)),
    record("first_step", 1010, "L1", step=1, **counters(0, 0, 0)),
    record("checkpoint", 1090, "L1", step=80, bytes=1234, blocked_s=5, write_s=2.5, committed=True, emergency=False,
           **counters(75, 5, 0)),
    record("heartbeat", 1130, "L1", step=100, **counters(100, 5, 5)),
    '{"event": "heartbeat", "time": 17000011',  # torn by the kill; the next launch starts a new line
    "\n",
    record("start", 1200, "L2", None, world_size=2, host="b", restart=1),
    record("resume", 1215, "L2", checkpoint="file:///ckpt/step-000000080", step=80, lost=40, **counters(0, 0, 0)),
    record("first_step", 1220, "L2", step=81, **counters(0, 0, 0)),
    record("stop_request", 1300, "L2", step=150, reason="SIGTERM", **counters(69, 0, 4)),
    record("checkpoint", 1305, "L2", step=150, bytes=1234, blocked_s=3, write_s=1, committed=True, emergency=True,
           **counters(69, 3, 4)),
    record("exit", 1306, "L2", status=75, step=150, **counters(69, 3, 4)),
    "not json at all\n",
    record("start", 1400, "L3", None, world_size=1, host="c", restart=0),
    record("resume", 1410, "L3", checkpoint="file:///ckpt/step-000000150", step=150, lost=0),
    record("first_step", 1412, "L3", step=151, **counters(0, 0, 0)),
    record("epoch", 1500, "L3", step=240, epoch=3, metrics={"val_loss": 0.5}, **counters(80, 5, 10)),
    record("exit", 1600, "L3", status=0, step=300, **counters(149, 10, 20)),
]


@pytest.fixture
def run_dir(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "events.jsonl").write_text("".join(LINES))
    return out


def test_report_charges_each_launch_of_the_current_lineage(run_dir):
    report = build_report(read_events(run_dir / "events.jsonl"))
    assert report.run_id == "run-B"  # run-A's launch is another lineage: left out, and no gap before L1
    l1, l2, l3 = report.launches
    assert [l.host for l in report.launches] == ["a", "b", "c"]
    # L1: killed (no exit record): its wall ends at its last complete record (the torn line is ignored)
    assert (l1.status, l1.gap_s, l1.wall_s, l1.startup_s, l1.final_step) == (None, 0, 130, 10, 100)
    assert (l1.productive_s, l1.recompute_s, l1.stall_s, l1.eval_s, l1.other_s) == (100, 0, 5, 5, 10)
    assert l1.outcome == "killed"
    # L2: the 40 lost steps are redone; step 81 is in startup, so 39 of the 69 timed steps (1 s each) are recompute
    assert (l2.gap_s, l2.wall_s, l2.startup_s, l2.resumed_from, l2.lost_steps) == (70, 106, 20, 80, 40)
    assert (l2.productive_s, l2.recompute_s, l2.stall_s, l2.eval_s, l2.other_s) == (30, 39, 3, 4, 10)
    assert (l2.status, l2.stop_reason, l2.outcome) == (75, "SIGTERM", "stopped (SIGTERM), exit 75")
    assert l2.effective_ratio == round(30 / (70 + 106), 4)
    # L3: nothing lost
    assert (l3.gap_s, l3.wall_s, l3.startup_s, l3.productive_s, l3.recompute_s, l3.other_s) == (94, 200, 12, 149, 0, 9)
    for launch in report.launches:  # the categories add up to the wall time
        parts = (launch.startup_s + launch.productive_s + launch.recompute_s + launch.stall_s + launch.eval_s
                 + launch.other_s)
        assert math.isclose(parts, launch.wall_s)
    totals = report.totals()
    assert (totals["launches"], totals["lost_steps"], totals["final_step"]) == (3, 40, 300)
    assert (totals["wall_s"], totals["gap_s"], totals["elapsed_s"]) == (436, 164, 600)
    assert (totals["productive_s"], totals["recompute_s"], totals["stall_s"]) == (279, 39, 18)
    assert totals["effective_ratio"] == round(279 / 600, 4)


def test_report_table_and_json_from_the_out_dir_or_the_job_file(run_dir, tmp_path, capsys):
    assert main(["report", str(run_dir)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith(f"run run-B in {run_dir}: 3 launch(es), 40 step(s) lost to kills, final step 300")
    rows = {line.split()[0]: line for line in table[2:]}
    assert set(rows) >= {"1", "2", "3", "total"}
    assert "killed" in rows["1"] and "stopped (SIGTERM), exit 75" in rows["2"] and "exit 0" in rows["3"]
    assert rows["total"].split()[-1] == "46.5%"

    job = write_job(tmp_path, "job", out_dir=str(run_dir))
    assert main(["report", str(job), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"out_dir", "run_id", "launches", "refused", "totals", "interval"}
    assert data["interval"] is None  # checkpoint.every: auto was not used
    assert data["out_dir"] == str(run_dir) and data["run_id"] == "run-B"
    assert [launch["status"] for launch in data["launches"]] == [None, 75, 0]
    assert [launch["lost_steps"] for launch in data["launches"]] == [0, 40, 0]
    assert [launch["recompute_s"] for launch in data["launches"]] == [0, 39, 0]
    assert [launch["gap_s"] for launch in data["launches"]] == [0, 70, 94]
    assert data["totals"]["final_step"] == 300 and data["totals"]["effective_ratio"] == 0.465


def test_a_launch_killed_before_it_knew_its_run_belongs_to_the_run_it_started_in(run_dir):
    with open(run_dir / "events.jsonl", "a") as f:
        f.write(record("start", 1700, "L4", None, world_size=1, restart=0))
    report = build_report(read_events(run_dir / "events.jsonl"))
    assert report.run_id == "run-B" and len(report.launches) == 4
    last = report.launches[-1]
    assert (last.gap_s, last.wall_s, last.startup_s, last.productive_s, last.final_step) == (100, 0, 0, 0, None)
    assert (last.start, last.restore_s) == (None, None)  # killed before it decided: nothing known restored


def test_a_fresh_starts_startup_is_not_reported_as_restore(run_dir, capsys):
    """README, "What a run did": every launch's start-up is `startup` (a part of its wall); only a launch that
    resumed spent it restoring a checkpoint, so only it has a restore figure."""
    l1, l2, l3 = build_report(read_events(run_dir / "events.jsonl")).launches
    assert (l1.start, l1.startup_s, l1.restore_s) == ("fresh", 10, None)
    assert (l2.start, l2.startup_s, l2.restore_s) == ("resumed", 20, 20)
    assert (l3.start, l3.startup_s, l3.restore_s) == ("resumed", 12, 12)

    assert main(["report", str(run_dir)]) == 0
    table = capsys.readouterr().out.splitlines()
    header = table[1].split()
    assert "startup" in header and "restore" not in header
    rows = {line.split()[0]: line.split() for line in table[2:] if line.split()[0] in {"1", "2", "3", "total"}}
    start = header.index("start")  # "started (UTC)" and a row's date and time are two cells each
    assert [rows[i][start] for i in "123"] == ["fresh", "resumed", "resumed"]

    assert main(["report", str(run_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(launch["start"], launch["startup_s"], launch["restore_s"]) for launch in data["launches"]] == [
        ("fresh", 10, None), ("resumed", 20, 20), ("resumed", 12, 12)]
    assert (data["totals"]["startup_s"], data["totals"]["restore_s"]) == (42, 32)  # restore: part of the startup


def test_report_without_events_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"runner: error: {tmp_path}/events.jsonl: no such file; give a run's out_dir or its job YAML")


def test_event_log_writes_whole_lines_from_rank_0_only_and_after_a_torn_tail(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(record("start", 0, "old", None) + '{"event": "heartbe')  # a launch killed mid-write
    log = EventLog(path, enabled=True)
    log.emit("start", world_size=2, pid=123)
    log.run_id = "run-X"
    log.emit("resume", checkpoint="file:///c/step-000000005", step=5, lost=2)
    log.close()
    EventLog(path, enabled=False).emit("start", world_size=2)  # another rank: writes nothing
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and lines[1] == '{"event": "heartbe'
    records = read_events(path)
    assert [r["event"] for r in records] == ["start", "start", "resume"]
    start, resume = records[1:]
    assert start["launch"] == resume["launch"] == log.launch and len(log.launch) == 32
    assert (start["run_id"], resume["run_id"], resume["lost"]) == (None, "run-X", 2)
    assert abs(start["time"] - time.time()) < 60 and start["pid"] == 123
    assert set(counters(0, 0, 0)) <= set(resume)  # every record carries the launch's cumulative counters


def test_first_step_then_heartbeats_at_most_every_heartbeat_s(tmp_path, monkeypatch):
    monkeypatch.setattr(events_module, "HEARTBEAT_S", 0.2)
    log = EventLog(tmp_path / "events.jsonl", enabled=True)
    log.after_step(1)
    for step in range(2, 50):
        log.after_step(step)  # within HEARTBEAT_S of the first_step record: nothing
    time.sleep(0.25)
    log.after_step(50)
    log.after_step(51)
    records = read_events(tmp_path / "events.jsonl")
    assert [(r["event"], r["step"]) for r in records] == [("first_step", 1), ("heartbeat", 50)]
    assert records[0]["productive_s"] < 0.01 and records[1]["productive_s"] >= 0.25  # productive from the first step
    assert log.step == 51


def test_timers_parts_add_up_to_the_elapsed_time():
    t0 = time.perf_counter()
    timers = Timers()
    timers.switch("productive")
    time.sleep(0.05)
    with timers.during("eval"):
        time.sleep(0.05)
        with timers.during("stall") as stall:
            time.sleep(0.03)
    time.sleep(0.02)
    timers.switch("other")
    elapsed = time.perf_counter() - t0
    c = timers.counters()
    assert c["stall_s"] == round(stall.seconds, 6) and 0.03 <= stall.seconds < 0.2
    assert c["eval_s"] >= 0.05 and c["productive_s"] >= 0.07  # back to eval, then to productive, after each block
    assert c["productive_s"] + c["eval_s"] + c["stall_s"] + timers.totals["other"] <= elapsed
    assert c["productive_s"] + c["eval_s"] + c["stall_s"] + timers.totals["other"] >= elapsed - 0.01


def write_metrics(out_dir):
    history = [{"epoch": e, "step": 60 * (e + 1), "train_loss": 2.0 / (e + 1), "train_acc": 0.5 + 0.09 * e,
                "val_loss": 2.2 / (e + 1), "val_acc": 0.45 + 0.1 * e, "lr": 0.01 * math.cos(e / 10)}
               for e in range(5)]
    (out_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))


def green_and_red_pixels(png):
    """Pixels of the restart (tab:green) and preemption (tab:red) marks, antialiasing included; the curves use
    blue and orange."""
    import matplotlib.image

    rgb = (matplotlib.image.imread(png)[..., :3] * 255).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    green = g - np.maximum(r, b) > 50
    red = (r - g > 120) & (g < 110)
    return int(green.sum()), int(red.sum())


def test_plot_draws_curves_with_restarts_and_preemptions_marked(run_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_metrics(run_dir)
    assert marks(read_events(run_dir / "events.jsonl")) == ([80, 150], [150])  # L2 and L3 resumed; L2 stopped
    png = tmp_path / "curves.png"
    assert main(["plot", str(run_dir), "-o", str(png)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {png}"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    green, red = green_and_red_pixels(png)
    assert green > 200 and red > 200  # dashed and dotted lines across three panels

    plain = tmp_path / "plain"
    plain.mkdir()
    write_metrics(plain)
    assert main(["plot", str(plain)]) == 0  # no events: curves only, into the out_dir
    assert green_and_red_pixels(plain / "curves.png") == (0, 0)


def test_plot_to_a_format_matplotlib_cannot_write_is_one_line(run_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    for name in ("curves.txt", "curves"):
        assert main(["plot", str(run_dir), "-o", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert name in err and ".png" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / name).exists()


def test_plot_without_matplotlib_names_the_extra(run_dir, monkeypatch, capsys):
    write_metrics(run_dir)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without the extra sees
    assert main(["plot", str(run_dir)]) == 2
    assert capsys.readouterr().err.strip() == "runner: error: runner plot needs matplotlib: pip install 'runner-train[plot]'"


# --- a real run through a SIGTERM and a SIGKILL ---------------------------------------------------------------

@pytest.mark.slow
def test_report_of_a_real_run_through_a_sigterm_and_a_sigkill(tmp_path):
    """2 ranks under torchrun: stopped by a signal, then killed, then run to the end; `runner report --json`
    counts the launches, the steps lost and the final step the test caused, and its parts add up to the wall."""
    from fault_helpers import text, wait_until
    from helpers import kill_everything, launched, ok, run_cli, run_torchrun, torchrun_cmd, write_job

    job = write_job(tmp_path, "job", base={
        "model": {"name": "mlp", "args": {"hidden": [32]}},
        "data": {"name": "synthetic", "args": {"size": 512, "val_size": 64}, "batch_size": 16},
        "optim": {"name": "AdamW", "lr": 0.01},
        "train": {"max_epochs": 3, "seed": 0, "progress": "plain"},
        "checkpoint": {"every_steps": 5}, "dist": {"timeout_s": 60}})
    first = run_torchrun("train", job, nproc=2, env={"RUNNER_TEST_SIGNAL_AT_STEP": "6"})  # agreed at step 7
    assert "preempted: step 7 committed" in first.stdout, first.stdout[-2000:] + first.stderr[-2000:]
    log = tmp_path / "second.txt"
    with launched(torchrun_cmd("train", job, nproc=2), log, RUNNER_TEST_SLOW_COMMIT_S=0.5) as second:
        wait_until(lambda: "checkpoint step 20 committed" in text(log), "a checkpoint at step 20", second, log)
        wait_until(lambda: int((tmp_path / "job" / "last_step").read_text() or 0) >= 23, "step 23", second, log)
        kill_everything(second, first=9)
    killed_at = int((tmp_path / "job" / "last_step").read_text())
    third = ok(run_torchrun("train", job, nproc=2))
    assert "done: 48 steps, 3 epochs" in third
    report = json.loads(ok(run_cli("report", job, "--json")))
    launches = report["launches"]
    assert len(launches) == 3 and launches[-1]["final_step"] == 48
    assert [launch["status"] for launch in launches] == [75, None, 0]
    assert launches[1]["resumed_from"] == 7 and launches[1]["lost_steps"] == 0
    assert launches[2]["resumed_from"] == 20 and launches[2]["lost_steps"] == killed_at - 20
    for launch in launches:  # the categories add up to the wall time (to rounding)
        parts = sum(launch[k] for k in ("startup_s", "productive_s", "recompute_s", "stall_s", "eval_s", "other_s"))
        assert parts == pytest.approx(launch["wall_s"], abs=0.05), launch
        assert launch["productive_s"] > 0 and launch["startup_s"] > 0
    assert [launch["start"] for launch in launches] == ["fresh", "resumed", "resumed"]
    assert launches[0]["restore_s"] is None  # the fresh start restored nothing
    assert [launch["restore_s"] for launch in launches[1:]] == [launch["startup_s"] for launch in launches[1:]]


def test_refused_launches_are_listed_apart_and_never_counted(run_dir, capsys):
    # A second launch refused by the lease while L3 runs, then a relaunch of the finished run refused for drift:
    # neither learnt a run id, and neither trained.
    with open(run_dir / "events.jsonl", "a") as f:
        f.write(record("start", 1450, "R1", None, world_size=1, host="d", restart=0))
        f.write(record("exit", 1515, "R1", None, status=2, step=None))
        f.write(record("start", 1700, "R2", None, world_size=1, host="c", restart=0))
        f.write(record("exit", 1705, "R2", None, status=2, step=None))
    report = build_report(read_events(run_dir / "events.jsonl"))
    assert [launch.host for launch in report.launches] == ["a", "b", "c"]
    assert [(r.launch, r.host, r.status) for r in report.refused] == [("R1", "d", 2), ("R2", "c", 2)]
    totals = report.totals()
    assert (totals["launches"], totals["final_step"], totals["elapsed_s"], totals["refused"]) == (3, 300, 600, 2)
    assert main(["report", str(run_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("final step 300, 10m00s elapsed, 2 refused launch(es) not counted")
    assert "2023-11-14 22:37:30 on d, exit 2" in "\n".join(lines) and lines[-3].startswith("refused")


def test_final_step_is_the_lineages_last_trained_step(run_dir):
    # A launch killed while starting (no run id, no step) is the lineage's last: the final step stays L3's.
    with open(run_dir / "events.jsonl", "a") as f:
        f.write(record("start", 1700, "L4", None, world_size=1, restart=0))
    assert build_report(read_events(run_dir / "events.jsonl")).totals()["final_step"] == 300


def test_compile_time_is_its_own_part_not_startup_or_productive(tmp_path):
    """README, "What a run did": with train.compile the compiler's seconds (the records' compile_s, at the first
    step and later) are the `compile` column; startup and productive keep only their own time."""
    lines = [
        record("start", 0, "C1", None, world_size=1),
        record("fresh", 2, "C1", **counters(0, 0, 0), compile_s=0),
        record("first_step", 40, "C1", step=1, **counters(0, 0, 0), compile_s=30.0),
        record("epoch", 100, "C1", step=50, epoch=1, metrics={}, **counters(40, 0, 2), compile_s=48.0),
        record("exit", 101, "C1", status=0, step=50, **counters(40, 0, 2), compile_s=48.0),
    ]
    (tmp_path / "events.jsonl").write_text("".join(lines))
    launch = build_report(load_events(tmp_path)).launches[0]
    assert (launch.startup_s, launch.compile_s, launch.productive_s) == (10.0, 48.0, 40.0)
    parts = (launch.startup_s + launch.productive_s + launch.recompute_s + launch.stall_s + launch.eval_s
             + launch.compile_s + launch.other_s)
    assert parts == pytest.approx(launch.wall_s) and launch.other_s == pytest.approx(1.0)
