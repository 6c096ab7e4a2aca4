"""Continue a hand-written run (model.init_optimizer): a file saved the way the PyTorch tutorial (or Lightning) saves
one gives runner its weights, optimizer state, schedule and epoch, and runner trains on as the script would have.

The proof is a plain PyTorch loop: the same model class, data, loss, optimizer and batch order (runner's
ShardedSampler, which is what must match) trained 2 epochs, saved, continued by `runner train` to 4, gives the
weights and optimizer state the same loop trained 4 epochs straight gives, bit for bit.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from helpers import assert_tensors_equal, newest_state, write_job
from runner import cli
from runner.config import DataConfig, load_config
from runner.data import ShardedSampler, build_datasets, steps_per_epoch
from runner.models import MLP

SEED = 0
BATCH = 64
JOB = {
    "model": {"name": "mlp", "args": {"hidden": [32]}},
    "data": {"name": "digits", "batch_size": BATCH},  # 1,437 training images: 23 steps per epoch
    "optim": {"name": "AdamW", "lr": 0.01},
    "train": {"max_epochs": 4, "seed": SEED, "progress": "plain"},
}
PER_EPOCH = 23
TRAIN = build_datasets(DataConfig(name="digits")).train  # as every job here splits it

OPTIMIZERS = {  # job config → the same optimizer by hand
    "AdamW": lambda params, lr: torch.optim.AdamW(params, lr=lr),
    "SGD": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
}


def hand_loop(epochs: int, optim: str = "AdamW", lr: float = 0.01, schedule: str | None = None, groups: int = 1):
    """Plain PyTorch, as a user's script: (model, optimizer, scheduler, optimizer steps) after `epochs`.
    `schedule`: "epoch" (StepLR halving every epoch) or "step" (StepLR halving every 20 optimizer steps)."""
    torch.manual_seed(123)
    model = MLP(64, 10, hidden=(32,))
    params = (model.parameters() if groups == 1 else
              [{"params": model.features.parameters()}, {"params": model.head.parameters()}])
    optimizer = OPTIMIZERS[optim](params, lr)
    scheduler = None if schedule is None else torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=1 if schedule == "epoch" else 20, gamma=0.5)
    sampler = ShardedSampler(len(TRAIN), rank=0, world_size=1, seed=SEED, shuffle=True, pad=True)
    loader = DataLoader(TRAIN, batch_size=BATCH, sampler=sampler)
    steps = 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)  # runner's order: a permutation seeded by (seed + epoch)
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            if schedule == "step":
                scheduler.step()
        if schedule == "epoch":
            scheduler.step()
    return model, optimizer, scheduler, steps


def tutorial_file(path: Path, epochs: int, save_schedule: bool = True, **loop) -> Path:
    """torch.save as https://pytorch.org/tutorials/beginner/saving_loading_models.html does, after `epochs`."""
    model, optimizer, scheduler, _ = hand_loop(epochs, **loop)
    saved = {"epoch": epochs - 1, "model_state_dict": model.state_dict(),
             "optimizer_state_dict": optimizer.state_dict(), "loss": 0.1}
    if scheduler is not None and save_schedule:
        saved["scheduler_state_dict"] = scheduler.state_dict()
    torch.save(saved, path)
    return path


def lightning_file(path: Path, epochs: int, **fields) -> Path:
    """What a LightningModule holding the net as `self.model` saves at an epoch's end (ModelCheckpoint)."""
    model, optimizer, _, steps = hand_loop(epochs)
    torch.save({"epoch": epochs - 1, "global_step": steps, "pytorch-lightning_version": "2.6.0",
                "state_dict": OrderedDict((f"model.{k}", v) for k, v in model.state_dict().items()),
                "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [],
                "loops": {}, "callbacks": {}, **fields}, path)
    return path


def train(tmp_path: Path, capsys, name: str = "job", **sections) -> tuple[int, str, str]:
    job = write_job(tmp_path, name, base=JOB, **sections)
    status = cli.main(["train", str(job)])
    out, err = capsys.readouterr()
    return status, out, err


def epochs_trained(tmp_path: Path, name: str = "job") -> list[int]:
    """The 0-based epochs metrics.jsonl records (it numbers them from 1, as the log does)."""
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["epoch"] - 1 for line in lines]


def one_line_error(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("optim, schedule, saved_schedule", [
    ("AdamW", None, False),
    ("SGD", "epoch", True),    # the file's scheduler state is loaded
    ("SGD", "step", False),    # none saved: runner steps the job's StepLR to step 46
], ids=["adamw", "sgd-epoch-schedule-saved", "sgd-step-schedule-replayed"])
def test_continued_run_ends_where_the_uninterrupted_loop_does(tmp_path, capsys, one_thread, optim, schedule,
                                                              saved_schedule):
    lr = 0.01 if optim == "AdamW" else 0.05
    ckpt = tutorial_file(tmp_path / "ckpt.tar", 2, save_schedule=saved_schedule, optim=optim, lr=lr,
                         schedule=schedule)
    scheduler = {"name": "StepLR", "args": {"step_size": 1 if schedule == "epoch" else 20, "gamma": 0.5},
                 "interval": schedule} if schedule else {}
    status, out, _ = train(tmp_path, capsys, model={"init_from": str(ckpt), "init_optimizer": True},
                           optim={"name": optim, "lr": lr, "args": {"momentum": 0.9} if optim == "SGD" else {}},
                           scheduler=scheduler)
    assert status == 0
    assert (f"continuing the run in {ckpt}: its 'epoch' 1 is the 0-based last finished epoch (model.init_epoch: "
            f"last_finished), so 2 epoch(s) are done; training epochs 3..4 (1-based) from step 46 (23 per epoch)") in out
    loaded = "optimizer, scheduler state loaded" if saved_schedule else "optimizer state loaded"
    assert loaded in out
    if schedule == "step":
        assert "no scheduler state saved: stepped this job's StepLR 46 time(s) (scheduler.interval: step)" in out
    assert epochs_trained(tmp_path) == [2, 3]

    model, optimizer, _, steps = hand_loop(4, optim=optim, lr=lr, schedule=schedule)
    state, manifest = newest_state(load_config(tmp_path / "job.yaml").checkpoint_dir)
    assert manifest["step"] == steps == 4 * PER_EPOCH
    assert_tensors_equal(state["model"], model.state_dict())  # bit-identical: max difference 0
    assert_tensors_equal(state["optimizer"]["state"], optimizer.state_dict()["state"])
    assert state["optimizer"]["param_groups"][0]["lr"] == optimizer.param_groups[0]["lr"]


def test_steps_per_epoch_counts_as_the_loop_does(tmp_path, capsys, one_thread):
    """Accumulation of 3 on 23 batches: 8 steps, the last of 2 batches; the loop's own count in the checkpoint."""
    status, _, _ = train(tmp_path, capsys, train={"max_epochs": 1, "accumulate": 3})
    assert status == 0
    _, manifest = newest_state(load_config(tmp_path / "job.yaml").checkpoint_dir)
    assert manifest["step"] == steps_per_epoch(len(TRAIN), 1, BATCH, 3) == 8
    assert [steps_per_epoch(1437, w, 64, 1) for w in (1, 2, 3, 7)] == [23, 12, 8, 4]  # ceil(ceil(N/W)/B)


def test_the_epoch_convention_decides_where_training_starts(tmp_path, capsys, one_thread):
    ckpt = tutorial_file(tmp_path / "ckpt.tar", 2)  # 'epoch': 1, as the tutorial's loop saves after 2 epochs
    model = {"init_from": str(ckpt), "init_optimizer": True}
    assert train(tmp_path, capsys, "last", model=model)[0] == 0
    assert epochs_trained(tmp_path, "last") == [2, 3]

    status, out, _ = train(tmp_path, capsys, "next", model={**model, "init_epoch": "next"})
    assert status == 0 and "so 1 epoch(s) are done; training epochs 2..4 (1-based) from step 23" in out
    assert epochs_trained(tmp_path, "next") == [1, 2, 3]

    bare = tmp_path / "bare.tar"
    torch.save({k: v for k, v in torch.load(ckpt, weights_only=True).items() if k != "epoch"}, bare)
    status, out, _ = train(tmp_path, capsys, "bare", model={**model, "init_from": str(bare)})
    assert status == 0 and f"continuing the run in {bare}: it saved no 'epoch', so training starts at epoch 1" in out
    assert epochs_trained(tmp_path, "bare") == [0, 1, 2, 3]

    status, _, err = train(tmp_path, capsys, "done", model=model, train={"max_epochs": 2})
    assert status == 2 and "so 2 epoch(s) are done, and train.max_epochs is 2: nothing to train" in one_line_error(err)

    # Only a fresh start reads the file: the finished run extends without init_from/init_optimizer (drift: free).
    status, out, _ = train(tmp_path, capsys, "last", model={"init_from": None}, train={"max_epochs": 5})
    assert status == 0 and "extending the finished run" in out
    assert epochs_trained(tmp_path, "last") == [2, 3, 4]


def test_lightning_checkpoint_continues_and_its_global_step_checks_the_convention(tmp_path, capsys, one_thread):
    ckpt = lightning_file(tmp_path / "epoch=1-step=46.ckpt", 2)
    model = {"init_from": str(ckpt), "init_optimizer": True}
    status, out, _ = train(tmp_path, capsys, model=model)
    assert status == 0 and "format: Lightning checkpoint 'state_dict'; keys: stripped 'model.'" in out
    assert "training epochs 3..4 (1-based) from step 46" in out
    state, _ = newest_state(load_config(tmp_path / "job.yaml").checkpoint_dir)
    assert_tensors_equal(state["model"], hand_loop(4)[0].state_dict())

    status, _, err = train(tmp_path, capsys, "next", model={**model, "init_epoch": "next"})
    assert status == 2 and "its 'global_step' 46 is 2 epoch(s) of this job's 23 steps; set model.init_epoch: " \
                           "last_finished" in one_line_error(err)


def test_a_lightning_fp16_checkpoints_grad_scaler_is_read(tmp_path, capsys, one_thread):
    """Lightning keeps an fp16 run's GradScaler under its precision plugin's class name: read, it cannot go on
    in fp32 unless allowed (fp16 itself needs CUDA, so this is the case a CPU can check)."""
    scaler = torch.amp.GradScaler("cpu").state_dict()
    ckpt = lightning_file(tmp_path / "epoch=1-step=46.ckpt", 2, MixedPrecision=scaler)
    status, _, err = train(tmp_path, capsys, model={"init_from": str(ckpt), "init_optimizer": True})
    assert status == 2 and 'train.precision "fp16" → "32"' in one_line_error(err)


def test_parameter_group_count_mismatch_is_one_line(tmp_path, capsys, one_thread):
    ckpt = tutorial_file(tmp_path / "ckpt.tar", 1, groups=2)
    status, _, err = train(tmp_path, capsys, model={"init_from": str(ckpt), "init_optimizer": True})
    assert status == 2
    assert (f"{ckpt}: its optimizer state has 2 parameter group(s), this job's optimizer has 1 (all); "
            "finetune.phases (lr_mult) and finetune.head make the groups") in one_line_error(err)


def test_other_hyperparameters_are_refused_unless_allowed(tmp_path, capsys, one_thread):
    ckpt = tutorial_file(tmp_path / "ckpt.tar", 1)  # AdamW, lr 0.01, weight_decay 0.01
    model = {"init_from": str(ckpt), "init_optimizer": True}
    optim = {"lr": 0.02, "args": {"weight_decay": 0.0}}
    status, _, err = train(tmp_path, capsys, model=model, optim=optim)
    assert status == 2
    assert (f"{ckpt} was saved with other settings than this job's (file → job): optim.args.weight_decay 0.01 → "
            "0.0, optim.lr 0.01 → 0.02; set the file's values in the job, or train on with the job's: "
            "resume.allow_changes=[optim.args.weight_decay,optim.lr]") in one_line_error(err)

    status, out, _ = train(tmp_path, capsys, model=model, optim=optim,
                           resume={"allow_changes": ["optim.lr", "optim.args"]})
    assert status == 0
    assert ("continuing with this job's settings (resume.allow_changes): optim.args.weight_decay 0.01 → 0.0; "
            "optim.lr 0.01 → 0.02") in out
    state, _ = newest_state(load_config(tmp_path / "job.yaml").checkpoint_dir)
    group = state["optimizer"]["param_groups"][0]
    assert (group["lr"], group["weight_decay"]) == (0.02, 0.0)


@pytest.mark.parametrize("what, sections, message", [
    ("no file", {"model": {"init_optimizer": True}},
     "job.yaml: 'model.init_optimizer' continues the run saved in model.init_from, which is not set"),
    ("weights only", {}, "holds no optimizer state to continue (its keys: epoch, model_state_dict, loss); save "
                         "optimizer.state_dict() under 'optimizer_state_dict'"),
    ("another optimizer", {"optim": {"name": "SGD", "lr": 0.01}},
     "eps, which this job's SGD does not take: it was saved from another optimizer; set optim.name to that one"),
    ("a schedule the job lacks", {}, "holds the state of a scheduler with base_lrs, gamma, last_epoch, step_size; "
                                     "this job's scheduler.name is not set"),
    ("a GradScaler state", {"scheduler": {"name": "StepLR", "args": {"step_size": 1, "gamma": 0.5}}},
     'was saved with other settings than this job\'s (file → job): train.precision "fp16" → "32"; set the file\'s '
     "values in the job, or train on with the job's: resume.allow_changes=[train.precision]"),
])
def test_files_that_cannot_continue_are_refused_in_one_line(tmp_path, capsys, one_thread, what, sections, message):
    ckpt = tutorial_file(tmp_path / "ckpt.tar", 1, optim="AdamW", schedule="epoch")
    if what == "weights only":
        torch.save({"epoch": 0, "model_state_dict": hand_loop(0)[0].state_dict(), "loss": 0.1}, ckpt)
    if what == "a GradScaler state":  # saved by an fp16 loop (the AMP recipe); this job trains in fp32
        torch.save({**torch.load(ckpt, weights_only=True), "scaler": torch.amp.GradScaler("cpu").state_dict()}, ckpt)
    model = {"init_from": str(ckpt), "init_optimizer": True, **sections.pop("model", {})}
    if what == "no file":
        model.pop("init_from")
    status, _, err = train(tmp_path, capsys, model=model, **sections)
    assert status == 2 and message in one_line_error(err)
