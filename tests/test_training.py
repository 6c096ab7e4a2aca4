"""The training loop, in process: determinism, early stopping, bf16 autocast, accumulation, max_steps,
scheduler interval, gradient clipping, progress output, regression."""
import csv
import json
import math
import random
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from runner import dist
from runner.config import RunConfig, load_config
from runner.errors import ConfigError
from runner.data import build_datasets
from runner.loop import build_job, train
from helpers import TINY_JOB, assert_tensors_equal, newest_state, write_job  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

# An MLP on a small synthetic set: 4 optimizer steps per epoch, a few ms each.
SYNTH = {
    "model": {"name": "mlp", "args": {"hidden": [16]}},
    "data": {"name": "synthetic", "args": {"shape": [8], "num_classes": 4, "size": 128, "val_size": 64},
             "batch_size": 32},
    "optim": {"name": "SGD", "lr": 0.1},
    "train": {"max_epochs": 2, "seed": 0, "progress": "plain"},
    "checkpoint": {"every_epoch": False},
}


def run(folder: Path, name: str, base: dict = SYNTH, **sections) -> RunConfig:
    cfg = load_config(write_job(folder, name, base=base, **sections))
    assert train(cfg) == 0
    return cfg


def history(cfg: RunConfig) -> list[dict]:
    path = Path(cfg.out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def final(cfg: RunConfig) -> tuple[dict, dict]:
    return newest_state(cfg.checkpoint_dir)


# --- determinism ----------------------------------------------------------------------------------------

def test_two_runs_of_the_same_job_end_identical(tmp_path):
    """CNN with BatchNorm and dropout, shuffled and augmented data: same job → bit-identical state."""
    sections = {"data": {"batch_size": 64, "args": {"augment": True, "classes": [0, 1, 2]}},
                "train": {"max_epochs": 1}}
    a = run(tmp_path, "a", base=TINY_JOB, **sections)
    torch.rand(5), random.random()  # whatever ran before must not matter
    b = run(tmp_path, "b", base=TINY_JOB, **sections)
    (state_a, manifest_a), (state_b, manifest_b) = final(a), final(b)
    assert manifest_a["step"] == manifest_b["step"] == math.ceil(len(build_datasets(a.data).train) / 64) > 1
    for section in ("model", "optimizer", "ranks"):
        assert_tensors_equal(state_a[section], state_b[section], section)
    assert history(a) == history(b)
    c = run(tmp_path, "c", base=TINY_JOB, data=sections["data"], train={"max_epochs": 1, "seed": 1})
    assert not torch.equal(final(c)[0]["model"]["head.weight"], state_a["model"]["head.weight"])


# --- early stopping ----------------------------------------------------------------------------------------
# The recorded `lr` is a metric with known values, so when training must stop is exact.

@pytest.mark.parametrize("gamma, mode, min_delta, patience, epochs", [
    (None, "min", 0.0, 2, 3),   # constant: never improves → stops after 1 + patience epochs
    (0.5, "max", 0.0, 1, 2),    # halving, larger is better → never improves after the first
    (0.5, "min", 0.0, 1, 5),    # halving, smaller is better → always improves → max_epochs
    (0.9, "min", 0.05, 2, 3),   # improves by 0.01 < min_delta → counts as no improvement
    (0.9, "min", 0.001, 2, 5),  # improves by more than min_delta each epoch
])
def test_early_stopping(tmp_path, capsys, gamma, mode, min_delta, patience, epochs):
    scheduler = {"name": "ExponentialLR", "args": {"gamma": gamma}} if gamma else {}
    cfg = run(tmp_path, "es", scheduler=scheduler, train={
        "max_epochs": 5, "early_stopping": {"metric": "lr", "mode": mode, "patience": patience,
                                            "min_delta": min_delta}})
    assert len(history(cfg)) == epochs
    state, manifest = final(cfg)
    assert manifest["epoch"] == epochs and state["progress"]["finished"]
    assert ("early stop" in capsys.readouterr().out) == (epochs < 5)


def test_early_stopping_on_a_missing_metric_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train.early_stopping.metric: no metric 'val_accuracy'.*val_acc"):
        run(tmp_path, "es", train={"early_stopping": {"metric": "val_accuracy"}})


# --- mixed precision ------------------------------------------------------------------------------------------

PROBE = """
    from torch import nn

    SEEN = []  # (training?, output dtype, weight dtype) per forward

    class Probe(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, num_classes))

        def forward(self, x):
            out = self.net(x)
            SEEN.append((self.training, out.dtype, self.net[1].weight.dtype))
            return out
"""


@pytest.fixture
def probe(tmp_path, monkeypatch):
    (tmp_path / "amp_probe.py").write_text(textwrap.dedent(PROBE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "amp_probe", raising=False)
    import amp_probe

    yield amp_probe
    sys.modules.pop("amp_probe", None)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("32", torch.float32)])
def test_autocast_on_cpu_trains(tmp_path, probe, precision, dtype):
    data = {"args": {"shape": [1, 8, 8], "size": 512}}
    cfg = run(tmp_path, "amp", base={**SYNTH, "model": {"name": "amp_probe:Probe"}}, data=data, optim={"name": "Adam", "lr": 0.003},
              train={"max_epochs": 3, "precision": precision})
    assert {seen[1] for seen in probe.SEEN} == {dtype}  # training and evaluation forwards
    assert {seen[0] for seen in probe.SEEN} == {True, False}
    assert {seen[2] for seen in probe.SEEN} == {torch.float32}  # weights stay float32
    h = history(cfg)
    assert h[2]["train_loss"] < h[1]["train_loss"] < h[0]["train_loss"]
    assert h[2]["val_loss"] < h[0]["val_loss"] and h[2]["val_acc"] > 0.5  # 4 classes: chance is 0.25
    assert final(cfg)[0]["model"]["net.1.weight"].dtype == torch.float32


def test_fp16_on_cpu_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        run(tmp_path, "fp16", train={"precision": "fp16", "device": "cpu"})


# --- gradient accumulation ------------------------------------------------------------------------------

def test_accumulation_step_count(tmp_path):
    size, batch, accumulate = 220, 20, 2  # 11 micro-batches: 5 pairs and a last group of one
    cfg = run(tmp_path, "acc", data={"args": {"size": size}, "batch_size": batch},
              train={"accumulate": accumulate, "max_epochs": 3})
    per_epoch = math.ceil(math.ceil(size / batch) / accumulate)
    h = history(cfg)
    assert [m["step"] for m in h] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    assert final(cfg)[1]["step"] == 3 * per_epoch
    assert h[-1]["train_loss"] < h[0]["train_loss"]


def test_accumulating_two_batches_equals_one_batch_twice_as_large(tmp_path):
    """Mean over 2 micro-batches of b == mean over one batch of 2b (an MLP has no batch statistics)."""
    data = {"args": {"size": 200}}
    accumulated = run(tmp_path, "acc", data={**data, "batch_size": 20}, train={"accumulate": 2, "max_epochs": 1})
    large = run(tmp_path, "large", data={**data, "batch_size": 40}, train={"max_epochs": 1})
    small = run(tmp_path, "small", data={**data, "batch_size": 20}, train={"max_epochs": 1})
    (a, ma), (b, mb), (c, mc) = final(accumulated), final(large), final(small)
    assert ma["step"] == mb["step"] == 5 and mc["step"] == 10
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a["model"]["head.weight"], c["model"]["head.weight"], atol=1e-4)


# --- max_steps --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_steps, epoch, batch_in_epoch", [
    (2, 0, 2),   # inside the first epoch
    (6, 1, 2),   # in the second epoch
    (4, 1, 0),   # exactly at an epoch's end
])
def test_max_steps_stops_mid_epoch_and_saves_that_step(tmp_path, capsys, max_steps, epoch, batch_in_epoch):
    cfg = run(tmp_path, "ms", train={"max_steps": max_steps, "max_epochs": 10})
    state, manifest = final(cfg)
    assert manifest["step"] == state["progress"]["step"] == max_steps
    assert (manifest["epoch"], manifest["sample_in_epoch"]) == (epoch, batch_in_epoch * 32)  # 1 process, batch 32
    assert state["progress"]["finished"]
    assert [m["epoch"] for m in history(cfg)][:epoch] == list(range(1, epoch + 1))  # finished epochs are logged
    assert f"done: {max_steps} steps" in capsys.readouterr().out


# --- scheduler interval -------------------------------------------------------------------------------------

@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_scheduler_steps_per_epoch_or_per_step(tmp_path, interval):
    lr, gamma = 0.1, 0.5
    cfg = run(tmp_path, "sched", optim={"lr": lr}, train={"max_epochs": 3},
              scheduler={"name": "StepLR", "args": {"step_size": 1, "gamma": gamma}, "interval": interval})
    h = history(cfg)
    # `lr` is the rate at the end of the epoch, before the epoch scheduler steps
    decays = [m["epoch"] - 1 if interval == "epoch" else m["step"] for m in h]
    assert [m["lr"] for m in h] == pytest.approx([lr * gamma**n for n in decays])
    assert h[-1]["step"] == 12
    expected_last = 3 if interval == "epoch" else 12
    assert final(cfg)[0]["scheduler"]["last_epoch"] == expected_last


# --- gradient clipping ----------------------------------------------------------------------------------------

def change_norm(cfg: RunConfig) -> float:
    initial = build_job(cfg, dist.setup(cfg.dist, "cpu")).model.state_dict()
    train(cfg)
    trained = final(cfg)[0]["model"]
    return math.sqrt(sum(float((trained[k] - initial[k]).pow(2).sum()) for k in initial))


def test_grad_clip_bounds_every_update(tmp_path):
    """Plain SGD with lr 1: each step moves the weights by at most grad_clip."""
    steps, clip = 4, 1e-3
    train_ = {"max_steps": steps, "max_epochs": 5}
    clipped = change_norm(load_config(write_job(tmp_path, "clip", base=SYNTH, optim={"lr": 1.0},
                                                train={**train_, "grad_clip": clip})))
    free = change_norm(load_config(write_job(tmp_path, "free", base=SYNTH, optim={"lr": 1.0}, train=train_)))
    assert 0 < clipped <= steps * clip * (1 + 1e-4)
    assert free > 10 * steps * clip  # without clipping the same steps move much further


# --- what the user sees -------------------------------------------------------------------------------------

EPOCH_LINE = re.compile(r"^\[runner\] epoch \d+ step \d+ train_loss", re.M)


def test_progress_bar_shows_rate_and_eta(tmp_path, capsys):
    run(tmp_path, "bar", train={"progress": "bar"})
    out = capsys.readouterr().out
    assert "it/s" in out and "ETA" in out and "epoch 1/2" in out and "epoch 2/2" in out
    assert "\r" in out  # one line that updates in place


@pytest.mark.parametrize("progress", ["plain", "auto"])  # auto: stdout is not a terminal here
def test_plain_logs_one_line_per_epoch(tmp_path, capsys, progress):
    run(tmp_path, "plain", train={"progress": progress, "max_epochs": 3})
    out = capsys.readouterr().out
    assert "it/s" not in out and "ETA" not in out and "\r" not in out
    assert len(EPOCH_LINE.findall(out)) == 3
    assert "val_loss" in out and "val_acc" in out


# --- regression ---------------------------------------------------------------------------------------------

def test_csv_regression_trains_without_accuracy(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, 2, generator=g)
    with (tmp_path / "r.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["a", "b", "y"])
        writer.writerows([[float(a), float(b), float(2 * a - b + 0.5)] for a, b in x])
    cfg = run(tmp_path, "reg", base={**SYNTH, "data": {"name": "csv", "batch_size": 20, "args": {
        "path": str(tmp_path / "r.csv"), "target": "y", "task": "regression"}}},
        model={"num_classes": 1}, optim={"name": "Adam", "lr": 0.01}, train={"loss": "mse", "max_epochs": 4})
    h = history(cfg)
    assert not any("acc" in key for m in h for key in m)
    assert h[-1]["val_loss"] < 0.5 * h[0]["val_loss"]
