"""The progress watchdog (README, "Hangs become restarts"; docs/design.md, "Hangs become restarts"): the allowance
rules; a hung process writes its stacks and exits 76; a SIGSTOPped worker under torchrun --max-restarts=1 is
detected by its peer long before dist.timeout_s, named by it, and the restarted group ends bit-identical to an
uninterrupted run; a long evaluation or a slow save is not a hang."""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from fault_helpers import (JOB, assert_same_final_state, finish, last_step, reference, resumed, wait_until,
                           workers_by_rank)
from helpers import launched, ok, run, run_cli, torchrun_cmd, write_job
from runner.config import WatchdogConfig
from runner.events import EventLog
from runner.watchdog import HANG_EXIT, Watchdog

QUICK = {"floor_s": 3, "step_multiple": 10, "first_step_s": 120}


def test_the_allowance_follows_the_activity_and_the_learned_step_time(tmp_path):
    events = EventLog(tmp_path / "events.jsonl", False)
    watchdog = Watchdog(WatchdogConfig(enabled=False, floor_s=3, step_multiple=10, first_step_s=100, save_s=50), 0,
                        1, str(tmp_path), events)
    assert watchdog.allowance("productive") == 100  # nothing learned yet: the first step's allowance
    watchdog.beat(1)  # the first step ends the start-up; later intervals are learned
    watchdog.intervals["productive"].extend([0.2] * 5)
    assert watchdog.allowance("productive") == 3  # 10 × 0.2 s is under the floor
    watchdog.intervals["productive"].extend([0.9] * 10)
    assert watchdog.allowance("productive") == pytest.approx(9)  # 10 × the median
    assert watchdog.allowance("eval") == 100 and watchdog.allowance("compile") == 100
    assert watchdog.allowance("stall") == 50
    watchdog.expect_slow()  # an epoch's first batch
    assert watchdog.allowance("productive") == 100


def test_a_hung_process_writes_every_threads_stack_and_exits_76(tmp_path):
    job = write_job(tmp_path, "job", base=JOB, watchdog=QUICK, data={"num_workers": 0})
    started = time.monotonic()
    proc = run_cli("train", job, env={"RUNNER_TEST_HANG_AT_STEP": 5, "OMP_NUM_THREADS": 1})  # sleeps after step 5
    assert proc.returncode == HANG_EXIT, proc.stderr[-3000:]
    assert time.monotonic() - started < 90
    (report,) = (tmp_path / "job" / "hangs").glob("rank-0-step-5-*.txt")
    text = report.read_text()
    assert text.startswith("rank 0 hung at step 5 (training) for ") and "inject_fault" in text, text[:3000]
    assert "runner-watchdog" not in text.splitlines()[0] and 'File "' in text  # Python stacks follow the line
    assert f"every thread's stack: {report}; exiting {HANG_EXIT}" in proc.stderr, proc.stderr[-3000:]
    hang = [json.loads(line) for line in (tmp_path / "job" / "events.jsonl").read_text().splitlines()
            if '"hang"' in line]
    assert hang and hang[0]["step"] == 5 and hang[0]["activity"] == "productive"


def test_a_rank_holding_the_gil_in_c_is_ended_by_faulthandlers_timer(tmp_path):
    """A C call that never releases the GIL starves the watchdog's own thread, so it cannot fire: the faulthandler
    timer it re-arms at each wake (a C thread) prints the stacks and exits 1 after watchdog.gil_s."""
    job = write_job(tmp_path, "job", base=JOB, watchdog={**QUICK, "gil_s": 3}, data={"num_workers": 0})
    started = time.monotonic()
    proc = run_cli("train", job, env={"RUNNER_TEST_HOLD_GIL_AT_STEP": 5, "OMP_NUM_THREADS": 1})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert time.monotonic() - started < 90
    assert "Timeout (0:00:03)!" in proc.stderr and "inject_fault" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "job" / "hangs").exists()  # the watchdog's thread never ran to write its report


def test_a_process_forked_while_the_gil_timer_is_armed_exits_normally():
    """CPython's faulthandler makes a forked child wait at exit for the timer thread it did not inherit: the timer
    is stopped around each fork (user code, a tracker, a DataLoader worker that returns instead of os._exit)."""
    script = ("import os, sys, time; from runner.watchdog import arm_gil_timer; arm_gil_timer(100); pid = os.fork()\n"
              "if pid == 0: sys.exit(0)\n"
              "os.waitpid(pid, 0); arm_gil_timer(None); print('child exited')")
    proc = run([sys.executable, "-c", script], timeout=60)
    assert proc.returncode == 0 and "child exited" in proc.stdout, proc.stderr[-3000:]


def test_a_long_evaluation_or_a_slow_save_is_not_a_hang(tmp_path):
    """Evaluation batches of 0.5 s (6 s in all) and saves of 4 s that the next save waits for, with a 2 s floor:
    evaluation learns its own batch time, and a blocked save has its own allowance."""
    job = write_job(tmp_path, "job", base=JOB, watchdog={"floor_s": 2, "step_multiple": 5, "first_step_s": 60},
                    data={"num_workers": 0}, checkpoint={"every_steps": 10}, train={"max_epochs": 1})
    out = ok(run_cli("train", job, env={"RUNNER_TEST_SLOW_EVAL_S": 0.5, "RUNNER_TEST_SLOW_COMMIT_S": 4,
                                         "OMP_NUM_THREADS": 1}))
    assert "done: 45 steps" in out and not (tmp_path / "job" / "hangs").exists(), out[-3000:]


@pytest.mark.slow
def test_a_sigstopped_worker_becomes_a_restart_in_seconds(tmp_path_factory, tmp_path):
    """Rank 1 is SIGSTOPped mid-epoch; rank 0 waits for it in a collective. Rank 0's watchdog fires after its
    allowance (seconds, with dist.timeout_s at 300), names rank 1 as not responding, and exits 76; torchrun
    restarts the group, which resumes from the last checkpoint and ends as an uninterrupted run."""
    ref = reference(tmp_path_factory, 2)
    job = write_job(tmp_path, "job", base=JOB, watchdog=QUICK, checkpoint={"every_steps": 5},
                    dist={"timeout_s": 300})
    out_dir, log = tmp_path / "job", tmp_path / "out.txt"
    with launched(torchrun_cmd("train", job, max_restarts=1), log, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) as agent:
        ranks = wait_until(lambda: last_step(out_dir) >= 28 and len(w := workers_by_rank(agent.pid)) == 2 and w,
                           "step 28", agent, log)
        os.kill(ranks[1], signal.SIGSTOP)
        stopped = time.monotonic()
        (report,) = wait_until(lambda: list((out_dir / "hangs").glob("rank-0-*.txt")), "rank 0's hang report",
                               agent, log, timeout=120)
        detected = time.monotonic() - stopped
        out = finish(agent, log)
    assert agent.returncode == 0, out[-3000:]
    assert detected < 60, f"detected {detected:.0f} s after the stop (dist.timeout_s 300)"
    first = report.read_text().splitlines()[0]
    assert first.startswith("rank 0 made no progress at step "), first
    assert "waiting for rank 1 (last heard of at step " in first and "not responding" in first, first
    assert len(resumed(out)) == 1, out[-3000:]  # one restart, from the last checkpoint
    assert_same_final_state(out_dir / "checkpoints", ref)
    print(f"SIGSTOP detected after {detected:.1f} s")
