"""An allowed change to the optimizer or the schedule on resume means the NEW schedule where the run is: the LR a run
with the new settings from the start would have at that step, with the restored optimizer state (README,
"Checkpoints and resume", config drift; docs/design.md, "Drift"). Each test fails on the code that set the changed
attribute on the restored scheduler.

All in process (cli.main) on a tiny synthetic job: 8 optimizer steps per epoch.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch

from helpers import newest_state, write_job
from helpers import train_in_process as train

JOB = {
    "model": {"name": "mlp", "args": {"hidden": [16]}},
    "data": {"name": "synthetic", "args": {"size": 256, "val_size": 64, "shape": [16]}, "batch_size": 32},
    "optim": {"name": "AdamW", "lr": 0.01},
    "train": {"max_epochs": 2, "seed": 0, "progress": "plain"},
}
ONE_CYCLE = {"optim": {"name": "SGD", "lr": 0.01, "args": {"momentum": 0.9}},
             "scheduler": {"name": "OneCycleLR", "args": {"max_lr": 0.05, "total_steps": 16}, "interval": "step"},
             "checkpoint": {"every_steps": 4}}


@pytest.fixture(autouse=True)
def quiet_env(monkeypatch, one_thread):
    for var in [v for v in os.environ if v.startswith("RUNNER_TEST_")]:
        monkeypatch.delenv(var)


def lrs(out_dir: Path) -> list[float]:
    """The LR of each epoch, as metrics.jsonl records it."""
    return [json.loads(line)["lr"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def one_cycle(at: list[int], **args) -> list[float]:
    """OneCycleLR's LR after each step count in `at`, on SGD(lr 0.01, momentum 0.9)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01, momentum=0.9)
    schedule, out = torch.optim.lr_scheduler.OneCycleLR(optimizer, **args), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(1, max(at) + 1):
            schedule.step()
            if step in at:
                out.append(optimizer.param_groups[0]["lr"])
    return out


def cosine(epoch: int, t_max: int, lr: float = 0.01, eta_min: float = 0.0) -> float:
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * epoch / t_max)) / 2


@pytest.fixture
def interrupted(tmp_path, capsys, monkeypatch):
    """A OneCycleLR run (16 steps) that crashed at step 6; its newest checkpoint is step 4."""
    job = write_job(tmp_path, "oc", base=JOB, **ONE_CYCLE)
    monkeypatch.setenv("RUNNER_TEST_FAIL_AT_STEP", "6")
    monkeypatch.setenv("RUNNER_TEST_FAULT_ONCE", str(tmp_path / "fired"))
    assert str(train(job, capsys=capsys)[0]).startswith("crash")
    return job


def test_a_raised_T_max_extends_a_finished_cosine_run_on_the_new_curve(tmp_path, capsys):
    job = write_job(tmp_path, "cos", base=JOB, scheduler={"name": "CosineAnnealingLR", "args": {"T_max": 2}})
    assert train(job, capsys=capsys)[0] == 0
    code, out, err = train(job, "train.max_epochs=4", "scheduler.args.T_max=4",
                           "resume.allow_changes=[scheduler.args]", capsys=capsys)
    assert code == 0, err
    assert "scheduler.args.T_max 2 → 4" in out
    # epochs 3 and 4 on T_max 4 (the old code trained them at lr 0: the chainable form goes on from the last LR)
    assert lrs(tmp_path / "cos") == pytest.approx([cosine(0, 2), cosine(1, 2), cosine(2, 4), cosine(3, 4)])


def test_a_new_base_lr_follows_the_schedule_with_its_floor(tmp_path, capsys):
    job = write_job(tmp_path, "cos", base=JOB,
                    scheduler={"name": "CosineAnnealingLR", "args": {"T_max": 4, "eta_min": 0.001}})
    assert train(job, capsys=capsys)[0] == 0
    code, out, err = train(job, "train.max_epochs=4", "optim.lr=0.02", "resume.allow_changes=[optim.lr]",
                           capsys=capsys)
    assert code == 0, err
    # the new curve from 0.02 down to eta_min, not the old LR doubled (eta_min does not scale)
    assert lrs(tmp_path / "cos")[2:] == pytest.approx([cosine(e, 4, 0.02, 0.001) for e in (2, 3)])


def test_an_allowed_max_lr_is_the_new_one_cycle_at_the_resumed_step(interrupted, tmp_path, capsys):
    code, out, err = train(interrupted, "scheduler.args.max_lr=0.5", "resume.allow_changes=[scheduler.args]",
                           capsys=capsys)
    assert code == 0, err
    assert lrs(tmp_path / "oc") == pytest.approx(one_cycle([8, 16], max_lr=0.5, total_steps=16))
    state, _ = newest_state(tmp_path / "oc" / "checkpoints")
    assert state["optimizer"]["param_groups"][0]["max_lr"] == 0.5


def test_an_allowed_total_steps_is_the_new_one_cycle_at_the_resumed_step(interrupted, tmp_path, capsys):
    code, out, err = train(interrupted, "train.max_epochs=3", "scheduler.args.total_steps=24",
                           "resume.allow_changes=[scheduler.args]", capsys=capsys)
    assert code == 0, err
    assert lrs(tmp_path / "oc") == pytest.approx(one_cycle([8, 16, 24], max_lr=0.05, total_steps=24))


def test_a_schedule_that_cannot_reach_the_resumed_step_is_refused_in_one_line(interrupted, capsys):
    code, out, err = train(interrupted, "scheduler.args.total_steps=3", "resume.allow_changes=[scheduler.args]",
                           capsys=capsys)
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("runner: error: scheduler.args.total_steps 16 → 3"), err
    assert "OneCycleLR cannot reach the run's position, 4 scheduler step(s)" in line and "epoch 1" not in out


def test_a_plateau_argument_change_is_refused_in_one_line(tmp_path, capsys):
    job = write_job(tmp_path, "p", base=JOB, train={"max_epochs": 1},
                    scheduler={"name": "ReduceLROnPlateau", "args": {"patience": 2}})
    assert train(job, capsys=capsys)[0] == 0
    code, out, err = train(job, "train.max_epochs=2", "scheduler.args.patience=0",
                           "resume.allow_changes=[scheduler.args]", capsys=capsys)
    line = err.strip().splitlines()[-1]
    assert code == 2 and "scheduler.args.patience 2 → 0: ReduceLROnPlateau cannot be rebuilt" in line, err
    assert "epoch 2" not in out


@pytest.mark.parametrize("override, key", [("data.batch_size=16", "data.batch_size"),
                                           ("train.accumulate=2", "train.accumulate")])
def test_allowing_the_batch_key_you_changed_is_enough(tmp_path, capsys, override, key):
    job = write_job(tmp_path, "b", base=JOB, train={"max_epochs": 1})
    assert train(job, capsys=capsys)[0] == 0
    code, out, err = train(job, "train.max_epochs=2", override, f"resume.allow_changes=[{key}]", capsys=capsys)
    assert code == 0, err
    assert f"the global batch changes from 32 to {16 if key == 'data.batch_size' else 64} ({key})" in out


def test_a_continued_runs_max_lr_is_compared_and_then_the_jobs_one_cycle(tmp_path, capsys):
    """model.init_optimizer: OneCycleLR keeps max_lr in the optimizer's groups, not in its state."""
    first = write_job(tmp_path, "first", base=JOB, **{**ONE_CYCLE, "train": {"max_epochs": 1}})
    assert train(first, capsys=capsys)[0] == 0
    state, _ = newest_state(tmp_path / "first" / "checkpoints")
    file = tmp_path / "tutorial.pt"  # as a training script saves it, after its first epoch (8 steps)
    torch.save({"epoch": 0, "model_state_dict": state["model"], "optimizer_state_dict": state["optimizer"],
                "scheduler_state_dict": state["scheduler"]}, file)
    job = write_job(tmp_path, "next", base=JOB, **ONE_CYCLE, model={"init_from": str(file), "init_optimizer": True})
    code, out, err = train(job, "scheduler.args.max_lr=0.5", capsys=capsys)
    line = err.strip().splitlines()[-1]
    # OneCycleLR derives the groups' initial_lr (compared as optim.lr) from max_lr, so both show
    assert code == 2 and "optim.lr 0.002 → 0.02, scheduler.args.max_lr 0.05 → 0.5;" in line, err
    code, out, err = train(job, "scheduler.args.max_lr=0.5", "resume.allow_changes=[optim.lr,scheduler.args]",
                           capsys=capsys)
    assert code == 0, err
    assert lrs(tmp_path / "next") == pytest.approx(one_cycle([16], max_lr=0.5, total_steps=16))


def test_the_rebuilt_schedule_keeps_the_fine_tune_phase_multiplier(tmp_path, capsys):
    job = write_job(tmp_path, "ft", base=JOB, scheduler={"name": "CosineAnnealingLR", "args": {"T_max": 2}},
                    finetune={"phases": [{"epochs": 1, "lr_mult": {"all": 0.1}}, {"lr_mult": {"all": 0.5}}]})
    assert train(job, capsys=capsys)[0] == 0
    code, out, err = train(job, "train.max_epochs=4", "scheduler.args.T_max=4",
                           "resume.allow_changes=[scheduler.args]", capsys=capsys)
    assert code == 0, err
    assert lrs(tmp_path / "ft")[2:] == pytest.approx([cosine(e, 4) * 0.5 for e in (2, 3)])


def test_a_schedule_changed_to_per_step_starts_at_the_run_s_step(tmp_path, capsys):
    """The new schedule's position is the run's (16 optimizer steps), not the old scheduler's count (2 epochs)."""
    job = write_job(tmp_path, "cos", base=JOB, scheduler={"name": "CosineAnnealingLR", "args": {"T_max": 2}})
    assert train(job, capsys=capsys)[0] == 0
    code, out, err = train(job, "train.max_epochs=4", "scheduler.args.T_max=32", "scheduler.interval=step",
                           "resume.allow_changes=[scheduler]", capsys=capsys)
    assert code == 0, err
    assert lrs(tmp_path / "cos")[2:] == pytest.approx([cosine(24, 32), cosine(32, 32)], abs=1e-9)
