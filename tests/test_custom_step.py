"""Your own training step (train.step; README, "Your own training step"): dict batches, a model that takes the
dict, a step returning (loss, metrics). The metrics are averaged over samples per epoch as train_<name> and
val_<name>; a 2-rank run stopped mid-epoch and resumed ends bit-identical to an uninterrupted one with the same
epoch metrics."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_tensors_equal, newest_state, ok, run_cli, run_torchrun, write_job
from runner.components import build_step
from runner.config import RunConfig, TrainConfig, load_config, manifest_config
from runner.data import Datasets
from runner.drift import Category, Change, category, trajectory_changes
from runner.errors import ConfigError
from runner.job import example_batch
from runner.loop import train
from runner.step import add_step

MODULE = "dict_seg_step"  # written next to the job file; the CLI puts that folder on sys.path
USER_CODE = '''
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset


class Squares(Dataset):
    """8×8 noisy images, each with a bright square of side 2 to 5; the mask marks the square."""

    draws_random = ()  # no augmentation: nothing to seed per sample

    def __init__(self, size, seed):
        g = torch.Generator().manual_seed(seed)
        self.masks = torch.zeros(size, 1, 8, 8)
        for i, (side, r, c) in enumerate(torch.randint(0, 100, (size, 3), generator=g).tolist()):
            side = 2 + side % 4
            r, c = r % (9 - side), c % (9 - side)
            self.masks[i, :, r:r + side, c:c + side] = 1.0
        self.images = self.masks + 0.5 * torch.randn(size, 1, 8, 8, generator=g)

    def __len__(self):
        return len(self.masks)

    def __getitem__(self, i):
        return {"image": self.images[i], "mask": self.masks[i]}


def build(size=99, val_size=20):
    return Squares(size, 0), Squares(val_size, 1)


class Segmenter(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                 nn.Dropout(0.2), nn.Conv2d(width, 1, 1))

    def forward(self, batch):
        return self.net(batch["image"])


def step(model, batch):
    logits = model(batch)
    loss = F.binary_cross_entropy_with_logits(logits, batch["mask"])
    pred, mask = logits.detach() > 0, batch["mask"] > 0.5
    iou = (pred & mask).sum() / (pred | mask).sum().clamp(min=1)
    return loss, {"iou": iou, "foreground": batch["mask"].mean()}


def logits(model, batch):
    return model(batch)


NOT_A_FUNCTION = 3


def one_argument(batch):
    return batch
'''

JOB = {
    "model": {"name": f"{MODULE}:Segmenter"},
    "data": {"name": f"{MODULE}:build", "batch_size": 8},
    "optim": {"name": "AdamW", "lr": 0.02},
    "train": {"max_epochs": 3, "seed": 0, "progress": "plain", "step": f"{MODULE}:step"},
}


def job_file(folder: Path, name: str = "job", **sections) -> Path:
    (folder / f"{MODULE}.py").write_text(USER_CODE)
    return write_job(folder, name, base=JOB, **sections)


def history(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """The user module, importable in this process."""
    (tmp_path / f"{MODULE}.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(MODULE, None)
    import importlib

    yield importlib.import_module(MODULE)
    sys.modules.pop(MODULE, None)


# --- one process ---------------------------------------------------------------------------------------------

def test_dict_batches_train_and_the_step_metrics_are_sample_weighted_epoch_means(tmp_path, user_module, one_thread):
    cfg = load_config(job_file(tmp_path))
    assert train(cfg) == 0
    epochs = history(tmp_path / "job")
    assert [m["epoch"] for m in epochs] == [1, 2, 3]  # numbered as the log numbers them
    assert {"train_loss", "train_iou", "train_foreground", "val_loss", "val_iou", "val_foreground"} <= epochs[0].keys()
    assert "train_acc" not in epochs[0] and "val_acc" not in epochs[0]  # only runner's own step measures accuracy
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"] and epochs[-1]["val_iou"] > epochs[0]["val_iou"]
    # every training sample counts once per epoch, whatever its batch (99 samples: 12 batches of 8, one of 3)
    masks = [user_module.build()[0][i]["mask"] for i in range(99)]
    foreground = sum(float(m.mean()) for m in masks) / 99
    assert epochs[0]["train_foreground"] == pytest.approx(foreground, rel=1e-9)
    assert foreground != pytest.approx(sum(float(m.mean()) for m in masks[96:]) / 3, rel=1e-3)  # it varies

    # val_* are means over samples: the final weights on the 20 validation samples in batches of 8, 8 and 4
    state, _ = newest_state(tmp_path / "job" / "checkpoints")
    model = user_module.Segmenter()
    model.load_state_dict(state["model"])
    model.eval()
    val = user_module.build()[1]
    sums, means = torch.zeros(2, dtype=torch.float64), []
    with torch.no_grad():
        for start in range(0, 20, 8):
            batch = {k: torch.stack([val[i][k] for i in range(start, min(start + 8, 20))]) for k in ("image", "mask")}
            loss, metrics = user_module.step(model, batch)
            n = len(batch["image"])
            sums += torch.tensor([float(loss), float(metrics["iou"])], dtype=torch.float64) * n
            means.append(float(loss))
    assert epochs[-1]["val_loss"] == pytest.approx(float(sums[0]) / 20, rel=1e-6)
    assert epochs[-1]["val_iou"] == pytest.approx(float(sums[1]) / 20, rel=1e-6)
    assert epochs[-1]["val_loss"] != pytest.approx(sum(means) / len(means), rel=1e-6)  # the weighting shows


@pytest.mark.slow
def test_the_step_gets_the_compiled_model_under_train_compile(tmp_path, user_module):
    """README, "Compiled training": train.step and train.compile together (dict batches through a compiled
    module, evaluation too); the checkpoint holds the plain module's keys."""
    job = job_file(tmp_path, train={"compile": True, "max_epochs": 1})
    out = ok(run_cli("train", job, env={"OMP_NUM_THREADS": 1}))
    compiled = [json.loads(line) for line in (tmp_path / "job" / "events.jsonl").read_text().splitlines()
                if '"compiled"' in line]
    assert compiled and compiled[-1]["compilations"] > 0, out[-3000:]
    assert {"train_iou", "val_iou"} <= history(tmp_path / "job")[0].keys()
    state, _ = newest_state(tmp_path / "job" / "checkpoints")
    assert sorted(state["model"]) == sorted(user_module.Segmenter().state_dict())


def test_summary_and_export_refuse_dict_samples_in_one_line(user_module):
    train_set, val_set = user_module.build()
    with pytest.raises(ConfigError, match=r"samples are dicts, not \(input tensor, target\) pairs"):
        example_batch(Datasets(train_set, val_set, None, ()))


# --- 2 ranks: stopped mid-epoch, resumed ---------------------------------------------------------------------

@pytest.mark.slow
def test_two_ranks_stopped_mid_epoch_and_resumed_end_bit_identical_with_the_same_metrics(tmp_path):
    """99 samples: 50 per rank (one padded), 7 micro-batches of 8 (the last of 2), 2 accumulated: 4 steps per
    epoch under DDP's no_sync. SIGTERM after step 5, agreed at step 6: mid-epoch 2."""
    sections = {"train": {"max_epochs": 2, "accumulate": 2}, "dist": {"timeout_s": 60}}
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    straight.mkdir(), stopped.mkdir()
    ok(run_torchrun("train", job_file(straight, **sections), env={"RUNNER_TEST_DUMP_WEIGHTS": straight / "dump"}))
    job = job_file(stopped, **sections)
    first = run_torchrun("train", job, env={"RUNNER_TEST_SIGNAL_AT_STEP": "5"})
    assert "preempted: step 6 committed" in first.stdout, first.stdout[-3000:] + first.stderr[-3000:]
    out = ok(run_torchrun("train", job, env={"RUNNER_TEST_DUMP_WEIGHTS": stopped / "dump"}))
    assert "step 6, epoch 2, sample 64 of the epoch" in out and "done: 8 steps, 2 epochs" in out
    assert "train_iou" in out

    want, got = history(straight / "job"), history(stopped / "job")
    assert got == want and {"train_iou", "val_iou", "train_foreground"} <= want[1].keys()
    dumps = {(run, rank): torch.load(run / "dump" / f"rank{rank}.pt") for run in (straight, stopped) for rank in (0, 1)}
    assert_tensors_equal(dumps[straight, 1], dumps[straight, 0], "rank 1 vs rank 0")  # DDP synced the gradients
    for rank in (0, 1):
        assert_tensors_equal(dumps[stopped, rank], dumps[straight, rank], f"rank {rank}")
    (a, _), (b, _) = newest_state(straight / "job" / "checkpoints"), newest_state(stopped / "job" / "checkpoints")
    for section in ("model", "optimizer"):
        assert_tensors_equal(b[section], a[section], section)


@pytest.mark.slow
def test_a_custom_step_trains_a_sharded_model_and_resumes_bit_identical(tmp_path):
    """train.step composes with dist.strategy fsdp: the user's step trains the FSDP2-sharded model (dict batches,
    accumulation without reduce-scatter before a group's last micro-batch), and a stop and resume end where the
    uninterrupted sharded run does, weights, optimizer state and step metrics."""
    from runner.store import CheckpointStore, sharded

    sections = {"train": {"max_epochs": 2, "accumulate": 2}, "dist": {"timeout_s": 60, "strategy": "fsdp"}}
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    straight.mkdir(), stopped.mkdir()
    ok(run_torchrun("train", job_file(straight, **sections)))
    job = job_file(stopped, **sections)
    first = run_torchrun("train", job, env={"RUNNER_TEST_SIGNAL_AT_STEP": "5"})
    assert "preempted: step 6 committed" in first.stdout, first.stdout[-3000:] + first.stderr[-3000:]
    out = ok(run_torchrun("train", job))
    assert "step 6, epoch 2, sample 64 of the epoch" in out and "done: 8 steps, 2 epochs" in out
    assert history(stopped / "job") == history(straight / "job")
    stores = [CheckpointStore(str(run / "job" / "checkpoints")) for run in (straight, stopped)]
    newest = [store.latest_valid() for store in stores]
    assert all(sharded.SHARDED in info.manifest for info in newest)
    for section in ("model", "optimizer"):
        assert_tensors_equal(*(sharded.read_full(store, info, section) for store, info in zip(stores, newest)),
                             section)


@pytest.mark.slow
def test_a_run_resumed_on_more_ranks_sums_the_step_metrics_of_every_rank(tmp_path):
    """Stopped mid-epoch on 1 process, resumed on 2: the new rank's metric sums start at zero beside rank 0's."""
    job = job_file(tmp_path, train={"max_epochs": 2}, dist={"timeout_s": 60})
    first = run_cli("train", job, env={"RUNNER_TEST_SIGNAL_AT_STEP": "3", "OMP_NUM_THREADS": 1})
    assert first.returncode == 75, first.stdout[-3000:] + first.stderr[-3000:]
    out = ok(run_torchrun("train", job, "resume.allow_world_size_change=true"))
    assert "world size 1 → 2" in out and "done:" in out
    epochs = history(tmp_path / "job")
    assert len(epochs) == 2 and all(0 < m["train_iou"] <= 1 and math.isfinite(m["train_loss"]) for m in epochs)


# --- errors --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, says", [
    ("train.step=no_such_module_xyz:step", "train.step: cannot import module 'no_such_module_xyz'"),
    (f"train.step={MODULE}:logits", f"train.step: {MODULE}:logits returned a tensor of shape [8, 1, 8, 8] (float32); "
                                    "return the loss as a scalar tensor"),
    ("train.step=null", "data: a batch is a dict, not (x, y)"),
])
def test_a_bad_step_is_one_line_and_exit_2(tmp_path, override, says):
    proc = run_cli("train", job_file(tmp_path), override, env={"OMP_NUM_THREADS": 1})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout[-2000:] + proc.stderr
    assert says in lines[0] and "Traceback" not in proc.stdout


@pytest.mark.parametrize("value, says", [
    ("step", "'step' is not an import path pkg.module:function"),
    (f"{MODULE}:", f"'{MODULE}:' is not an import path"),
    (f"{MODULE}:missing", f"module '{MODULE}' has no attribute 'missing'"),
    (f"{MODULE}:NOT_A_FUNCTION", f"'{MODULE}:NOT_A_FUNCTION' is a int, not a function fn(model, batch)"),
    (f"{MODULE}:one_argument", "takes (batch); runner calls it as fn(model, batch)"),
])
def test_bad_step_values_name_train_step(user_module, value, says):
    with pytest.raises(ConfigError) as info:
        build_step(value)
    assert str(info.value).startswith("train.step: ") and says in str(info.value)
    assert build_step(f"{MODULE}:step") is user_module.step and build_step(None) is None


def test_metric_names_that_change_between_calls_are_refused():
    sums = torch.zeros(4, dtype=torch.float64)
    add_step(sums, ["iou"], torch.tensor(0.5), {"iou": torch.tensor(0.25)}, 4)
    assert sums.tolist() == [2.0, 0.0, 4.0, 1.0]
    with pytest.raises(ConfigError, match=r"train.step: the metrics it returns changed from \['iou'\] to \['dice'\]"):
        add_step(sums, ["iou"], torch.tensor(0.5), {"dice": 0.5}, 4)


def test_setting_or_changing_the_step_is_a_trajectory_change():
    saved = manifest_config(RunConfig())
    del saved["train"]["step"]  # a checkpoint written before train.step existed
    assert trajectory_changes(saved, manifest_config(RunConfig())) == []
    assert category("train.step") is Category.TRAJECTORY
    assert trajectory_changes(saved, manifest_config(RunConfig(train=TrainConfig(step="m:f")))) == [
        Change("train.step", None, "m:f")]
