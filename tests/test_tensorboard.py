"""metrics.tensorboard: the curves in <out_dir>/tb, read back with TensorBoard's own reader, continue across a
crash and a resume without duplicate or out-of-order steps, and agree with metrics.jsonl.

In process (cli.main) on a tiny synthetic job: 8 optimizer steps per epoch, 3 epochs.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from helpers import write_job
from runner import cli

pytest.importorskip("tensorboard", reason="pip install 'runner-train[tensorboard]'")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

JOB = {
    "model": {"name": "cnn", "args": {"width": 8}},
    "data": {"name": "synthetic", "args": {"size": 256, "val_size": 64}, "batch_size": 32},
    "optim": {"name": "AdamW", "lr": 0.01},
    "train": {"max_epochs": 3, "seed": 0, "progress": "plain", "log_every_steps": 2},
    "metrics": {"tensorboard": True},
}
STEPS = 24  # 3 epochs of 8 steps
CHECKPOINT_EVERY, CRASH_AT = 4, 15  # the crash loses steps 13-15, and the log step 14 written before it


@pytest.fixture(autouse=True)
def quiet_env(monkeypatch, one_thread):
    for var in [v for v in os.environ if v.startswith("RUNNER_TEST_")]:
        monkeypatch.delenv(var)


def scalars(path) -> dict[str, list]:
    """Every scalar tag → its events, as TensorBoard shows them (purge_step honoured, nothing sampled away)."""
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def float32(value: float) -> float:
    return float(np.float32(value))


def test_resumed_run_continues_the_curves_without_duplicates(tmp_path, monkeypatch):
    job = write_job(tmp_path, "tb", base=JOB, checkpoint={"every_steps": CHECKPOINT_EVERY})
    out = tmp_path / "tb"
    monkeypatch.setenv("RUNNER_TEST_FAIL_AT_STEP", str(CRASH_AT))
    monkeypatch.setenv("RUNNER_TEST_FAULT_ONCE", str(tmp_path / "crashed"))
    with pytest.raises(RuntimeError, match=f"injected test fault at step {CRASH_AT}"):
        cli.main(["train", str(job)])
    [first_launch] = sorted((out / "tb").iterdir())
    assert [e.step for e in scalars(first_launch)["train/loss_running"]][-1] == CRASH_AT - 1  # past the checkpoint
    assert cli.main(["train", str(job)]) == 0

    curves = scalars(out / "tb")
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    names = [k for k in history[0] if k not in ("epoch", "step")]
    assert sorted(curves) == sorted(["train/loss_running", "train/lr", *(f"epoch/{n}" for n in names)])
    for tag, events in curves.items():
        steps = [e.step for e in events]
        assert steps == sorted(set(steps)), f"{tag}: steps {steps}"
    log_steps = list(range(2, STEPS + 1, 2))
    assert [e.step for e in curves["train/loss_running"]] == log_steps
    assert [(e.step, e.value) for e in curves["train/lr"]] == [(s, float32(0.01)) for s in log_steps]
    assert len(history) == 3
    for name in names:
        assert [(e.step, e.value) for e in curves[f"epoch/{name}"]] == [
            (m["step"], float32(m[name])) for m in history], name


def test_missing_package_is_one_line_before_training(tmp_path, monkeypatch, capsys):
    job = write_job(tmp_path, "tb", base=JOB)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what an environment without it raises
    assert cli.main(["train", str(job)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("runner: error: ") and \
        "pip install 'runner-train[tensorboard]'" in err and "metrics.tensorboard" in err, err
    assert not (tmp_path / "tb").exists()  # nothing started: no checkpoint, no metrics, no events
