"""Where a run can stop, and that going on from there trains what an uninterrupted run trains (README,
"Checkpoints and resume" and "Preemption and fault tolerance"; docs/design.md, "Saving" and "Stopping"):
a max_steps limit inside an epoch, later raised; a stop request during a long evaluation.

"Bit-identical" compares the final checkpoint's model, optimizer, scheduler and progress (history included)
with a run that was never stopped.
"""
from __future__ import annotations

import json
import os
import signal
import textwrap
import time
from pathlib import Path

import pytest

from fault_helpers import finish, last_step, resumed, wait_until, workers_by_rank
from helpers import assert_tensors_equal, launched, merge, newest_state, runner_cmd, torchrun_cmd, write_job
from runner import cli
from runner.preemption import PREEMPTED_EXIT

# The reviewer's job: 23 optimizer steps per epoch (digits, 1 process, batch 64), an epoch-interval schedule,
# plus dropout and early stopping (never triggered) that a wrong stop would also shift.
JOB = {
    "model": {"name": "mlp", "args": {"hidden": [32], "dropout": 0.1}},
    "data": {"name": "digits", "batch_size": 64, "args": {"flatten": True}},
    "optim": {"name": "AdamW", "lr": 0.01},
    "scheduler": {"name": "CosineAnnealingLR", "args": {"T_max": 4}, "interval": "epoch"},
    "train": {"max_epochs": 4, "seed": 0, "progress": "plain",
              "early_stopping": {"metric": "val_loss", "patience": 10}},
    "checkpoint": {"every_epoch": False},
}
STEPS_PER_EPOCH = 23


@pytest.fixture(autouse=True)
def quiet_env(monkeypatch, one_thread):
    for var in [v for v in os.environ if v.startswith("RUNNER_TEST_")]:
        monkeypatch.delenv(var)


def train(job: Path, *overrides, capsys) -> str:
    code = cli.main(["train", str(job), *map(str, overrides)])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    return out.out


def records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(got_dir: Path, want_dir: Path) -> None:
    (got, _), (want, _) = newest_state(got_dir / "checkpoints"), newest_state(want_dir / "checkpoints")
    for section in ("model", "optimizer", "scheduler", "progress"):
        assert_tensors_equal(got[section], want[section], section)
    assert records(got_dir) == records(want_dir)


# --- 1. a max_steps limit inside an epoch, then raised ---------------------------------------------------------

@pytest.mark.parametrize("final", [69, 60])  # 69: on an epoch's end; 60: inside epoch 3
def test_raising_max_steps_stopped_mid_epoch_trains_what_the_larger_limit_trains(tmp_path, capsys, final):
    straight = write_job(tmp_path, "straight", base=JOB)
    train(straight, f"train.max_steps={final}", capsys=capsys)
    job = write_job(tmp_path, "ext", base=JOB)
    first_out = train(job, "train.max_steps=30", capsys=capsys)
    first = records(tmp_path / "ext")
    out = train(job, f"train.max_steps={final}", capsys=capsys)
    assert "extending the finished run" in out and f"done: {final} steps" in out
    assert_same_run(tmp_path / "ext", tmp_path / "straight")
    # the first run evaluated its last weights and said the record is partial
    assert [(m["epoch"], m["step"], m.get("partial")) for m in first] == [(1, 23, None), (2, 30, True)]
    assert "epoch 2 step 30 " in first_out and "(partial epoch)" in first_out
    history = records(tmp_path / "ext")
    assert [m["epoch"] for m in history if not m.get("partial")] == list(range(1, final // STEPS_PER_EPOCH + 1))
    assert history[1]["step"] == 46  # epoch 2's record covers the whole epoch, the partial one is gone


# --- 5. a stop request during a long evaluation --------------------------------------------------------------

SLOW_EVAL = {"data": {"eval_batch_size": 8}, "preemption": {"grace_s": 5}, "train": {"max_epochs": 2}}
EVAL_S = 0.25  # × 45 evaluation batches: about 11 s, longer than grace_s and the watchdog's margin


def stop_during_evaluation(tmp_path: Path, cmd: list[str], out_dir: Path, signal_target) -> tuple[str, float]:
    """Run `cmd`, SIGTERM `signal_target(proc)` once the first epoch's training is done (its evaluation is
    running), wait for the exit; returns the log and the seconds from the signal to the exit."""
    log = tmp_path / "first.txt"
    with launched(cmd, log, RUNNER_TEST_SLOW_EVAL_S=EVAL_S) as proc:
        wait_until(lambda: last_step(out_dir) >= STEPS_PER_EPOCH, "the first epoch's last step", proc, log)
        time.sleep(4 * EVAL_S)  # into the evaluation, well before its end
        os.kill(signal_target(proc), signal.SIGTERM)
        sent = time.monotonic()
        out = finish(proc, log)
        return out, time.monotonic() - sent


def assert_resumes_to_the_straight_run(tmp_path: Path, cmd: list[str], straight_cmd: list[str], step: int) -> None:
    log = tmp_path / "second.txt"
    with launched(cmd, log) as proc:
        out = finish(proc, log)
    assert proc.returncode == 0 and [(s, lost) for _, s, lost in resumed(out)] == [(step, 0)], out[-3000:]
    assert "epoch 1 step 23 train_loss" in out, out[-3000:]  # the cut evaluation, done again
    with launched(straight_cmd, tmp_path / "straight.txt") as proc:
        out = finish(proc, tmp_path / "straight.txt")
    assert proc.returncode == 0, out[-3000:]
    assert_same_run(tmp_path / "job", tmp_path / "straight")


@pytest.mark.slow
def test_sigterm_during_evaluation_commits_the_epoch_trained_and_resumes_bit_identical(tmp_path):
    job = write_job(tmp_path, "job", base=JOB, **SLOW_EVAL)
    out, took = stop_during_evaluation(tmp_path, runner_cmd("train", job), tmp_path / "job", lambda p: p.pid)
    assert "evaluation of epoch 1 cut by the stop request" in out, out[-3000:]
    assert f"preempted: step {STEPS_PER_EPOCH} committed" in out and "this process is stuck" not in out, out[-3000:]
    assert took < 5, took  # within grace_s
    _, manifest = newest_state(tmp_path / "job" / "checkpoints")
    assert (manifest["step"], manifest["epoch"], manifest["metrics"]) == (STEPS_PER_EPOCH, 0, {})
    straight = write_job(tmp_path, "straight", base=JOB, **SLOW_EVAL)
    assert_resumes_to_the_straight_run(tmp_path, runner_cmd("train", job), runner_cmd("train", straight),
                                       STEPS_PER_EPOCH)


@pytest.mark.slow
def test_sigterm_to_one_rank_during_evaluation_stops_every_rank(tmp_path):
    """Rank 1 alone gets the signal; its evaluation share is one sample short of rank 0's: the ranks agree
    after batches both have, and all exit 75 with the epoch's training committed."""
    two_ranks = merge(SLOW_EVAL, {"data": {"eval_batch_size": 4, "batch_size": 32}})  # 23 steps per epoch still
    job = write_job(tmp_path, "job", base=JOB, **two_ranks)
    out, took = stop_during_evaluation(tmp_path, torchrun_cmd("train", job), tmp_path / "job",
                                       lambda agent: workers_by_rank(agent.pid)[1])
    assert "evaluation of epoch 1 cut by the stop request" in out, out[-3000:]
    assert f"preempted: step {STEPS_PER_EPOCH} committed" in out and "this process is stuck" not in out, out[-3000:]
    assert took < 5, took
    straight = write_job(tmp_path, "straight", base=JOB, **two_ranks)
    assert_resumes_to_the_straight_run(tmp_path, torchrun_cmd("train", job), torchrun_cmd("train", straight),
                                       STEPS_PER_EPOCH)


# --- a stop request while the run starts (resume, the data loader's start), before its first step -------------

SIGNALLING_DATA = """
    import os
    import signal
    from pathlib import Path

    from torch.utils.data import Dataset

    from runner.data import Datasets, digits

    class Signalling(Dataset):
        '''digits, whose first sample ever loaded comes with a SIGTERM (a stop while the loader starts).'''
        draws_random = ()

        def __init__(self, base, marker):
            self.base, self.marker = base, Path(marker)

        def __len__(self):
            return len(self.base)

        def __getitem__(self, index):
            if not self.marker.exists():
                self.marker.touch()
                os.kill(os.getpid(), signal.SIGTERM)
            return self.base[index]

    def build(marker, **args):
        d = digits(**args)
        return Datasets(Signalling(d.train, marker), d.val, d.num_classes, d.input_shape)
"""


def test_stop_while_the_run_starts_takes_no_step_and_resumes_bit_identical(tmp_path, capsys, monkeypatch):
    (tmp_path / "signalling_data.py").write_text(textwrap.dedent(SIGNALLING_DATA))
    monkeypatch.syspath_prepend(str(tmp_path))
    short = {"max_epochs": 1, "max_steps": 5}
    (tmp_path / "fired").touch()
    straight = write_job(tmp_path, "straight", base=JOB, train=short,
                         data={"name": "signalling_data:build", "args": {"marker": str(tmp_path / "fired")}})
    train(straight, capsys=capsys)
    job = write_job(tmp_path, "job", base=JOB, train=short,
                    data={"name": "signalling_data:build", "args": {"marker": str(tmp_path / "once")}})
    code = cli.main(["train", str(job)])
    out = capsys.readouterr().out
    assert code == PREEMPTED_EXIT and "SIGTERM: saving step 0 before exiting" in out, out
    assert last_step(tmp_path / "job") == 0  # not one step trained
    train(job, capsys=capsys)
    assert_same_run(tmp_path / "job", tmp_path / "straight")
