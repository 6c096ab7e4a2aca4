"""Bring your own checkpoint: files written the way the PyTorch tutorial, Lightning and DDP write them load through
`model.init_from` (format and key mapping named in the log), refusals are one line and run no code, and
`runner export --checkpoint best|step-N` / `runner ckpt ls` pick the best checkpoint by its metric."""
from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import newest_state, write_job
from runner import cli
from runner.store import CheckpointStore
from runner.config import load_config
from runner.errors import CheckpointError
from runner.weights import load_pretrained

# One SGD step at lr 0 leaves the weights as loaded, so the run's checkpoint shows exactly what init_from loaded.
JOB = {
    "model": {"name": "mlp", "args": {"hidden": [16]}},
    "data": {"name": "synthetic", "args": {"shape": [1, 4, 4], "num_classes": 3, "size": 32, "val_size": 8},
             "batch_size": 16},
    "optim": {"name": "SGD", "lr": 0.0},
    "train": {"max_epochs": 1, "max_steps": 1, "progress": "plain"},
}


def job_model(job: Path) -> nn.Module:
    return cli.model_from_job(load_config(job))[0]


def source_weights(job: Path, seed: int = 1) -> OrderedDict:
    torch.manual_seed(seed)
    return OrderedDict((k, torch.randn_like(v)) for k, v in job_model(job).state_dict().items())


def optimizer_state(weights: dict) -> dict:
    """A real optimizer's state_dict after one step, as a training script would save it."""
    params = [nn.Parameter(v.clone()) for v in weights.values()]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    sum(p.sum() for p in params).backward()
    opt.step()
    return opt.state_dict()


def tutorial_file(folder: Path, weights: dict) -> Path:
    # https://pytorch.org/tutorials/beginner/saving_loading_models.html, "Saving & Loading a General Checkpoint"
    path = folder / "ckpt.tar"
    torch.save({"epoch": 2, "model_state_dict": weights, "optimizer_state_dict": optimizer_state(weights),
                "loss": 0.42}, path)
    return path


def lightning_file(folder: Path, weights: dict, hyper_parameters: dict | None = None) -> Path:
    """What Trainer.save_checkpoint writes for a LightningModule holding the net as `self.model` and a weighted
    loss as `self.loss_fn` (a buffer outside `model.`)."""
    state_dict = OrderedDict((f"model.{k}", v) for k, v in weights.items())
    state_dict["loss_fn.weight"] = torch.ones(3)
    scheduler = torch.optim.lr_scheduler.StepLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), 5)
    path = folder / "epoch=1-step=40.ckpt"
    torch.save({
        "epoch": 1, "global_step": 40, "pytorch-lightning_version": "2.4.0", "state_dict": state_dict,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 2, "completed": 1}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
            "best_model_score": torch.tensor(0.31), "best_model_path": str(path), "dirpath": str(folder)}},
        "optimizer_states": [optimizer_state(weights)], "lr_schedulers": [scheduler.state_dict()],
        "hparams_name": "kwargs",
        "hyper_parameters": hyper_parameters or {"lr": 0.01, "hidden": [16], "optimizer": "sgd"},
    }, path)
    return path


def ddp_file(folder: Path, weights: dict) -> Path:
    path = folder / "ddp.pt"  # rank 0 saving a DistributedDataParallel model's state_dict()
    torch.save(OrderedDict((f"module.{k}", v) for k, v in weights.items()), path)
    return path


@pytest.mark.parametrize("write, logged", [
    (tutorial_file, "format: tutorial checkpoint 'model_state_dict'\n"),
    (lightning_file, "ignored (outside 'model.'): loss_fn.weight; format: Lightning checkpoint 'state_dict'; "
                     "keys: stripped 'model.'\n"),
    (ddp_file, "format: state_dict; keys: stripped 'module.'\n"),
], ids=["tutorial", "lightning", "ddp"])
def test_train_starts_from_each_format(tmp_path, capsys, one_thread, write, logged):
    job = write_job(tmp_path, base=JOB)
    weights = source_weights(job)
    path = write(tmp_path, weights)
    job = write_job(tmp_path, base=JOB, model={"init_from": str(path)})
    assert cli.main(["train", str(job)]) == 0
    out = capsys.readouterr().out
    n = len(weights)
    assert f"loaded {n}/{n} tensors from {path}; missing: none; unexpected: none; " in out and logged in out
    trained, _ = newest_state(load_config(job).checkpoint_dir)
    assert trained["model"].keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(trained["model"][key], value), key


@pytest.mark.parametrize("holder, named", [("model_state_dict", "tutorial checkpoint 'model_state_dict'"),
                                           ("state_dict", "checkpoint dict 'state_dict'"),
                                           ("model", "checkpoint dict 'model'"),
                                           ("module", "checkpoint dict 'module'")])
def test_weights_are_found_under_each_key(tmp_path, holder, named):
    job = write_job(tmp_path, base=JOB)
    weights = source_weights(job)
    torch.save({holder: weights, "epoch": 3, "note": "extra fields are ignored"}, tmp_path / "c.pt")
    model = job_model(job)
    assert load_pretrained(model, str(tmp_path / "c.pt")).endswith(f"; format: {named}")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_a_weights_only_load_ignores_what_a_continued_run_would_refuse(tmp_path):
    """Two optimizers (a GAN's Lightning .ckpt) or an odd 'epoch' cannot continue a run, but they must not stop
    model.init_from from loading the weights."""
    job = write_job(tmp_path, base=JOB)
    weights = source_weights(job)
    torch.save({"state_dict": weights, "epoch": 2.5, "optimizer_states": [{"param_groups": [], "state": {}}] * 2},
               tmp_path / "c.pt")
    model = job_model(job)
    load_pretrained(model, str(tmp_path / "c.pt"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_dict_without_weights_names_its_keys(tmp_path):
    torch.save({"epoch": 3, "loss": 0.5}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError) as err:
        load_pretrained(job_model(write_job(tmp_path, base=JOB)), str(tmp_path / "c.pt"))
    assert "keys: epoch, loss" in str(err.value) and "model_state_dict, state_dict, model, module" in str(err.value)


class Wrapped(nn.Module):
    """A model that holds the pretrained net one level down, as `backbone`."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.backbone = net
        self.fc = nn.Linear(3, 2)


def test_prefix_is_added_when_the_model_nests_the_net(tmp_path):
    job = write_job(tmp_path, base=JOB)
    weights = source_weights(job)
    torch.save(weights, tmp_path / "plain.pt")
    model = Wrapped(job_model(job))
    report = load_pretrained(model, str(tmp_path / "plain.pt"), new_head="fc")
    assert report.endswith("format: state_dict; keys: added 'backbone.'")
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in weights.items())


def test_two_equal_mappings_are_an_error_until_init_prefix_picks_one(tmp_path):
    job = write_job(tmp_path, base=JOB)
    student, teacher = source_weights(job, seed=1), source_weights(job, seed=2)
    distilled = {**{f"student.{k}": v for k, v in student.items()}, **{f"teacher.{k}": v for k, v in teacher.items()}}
    url = str(tmp_path / "distill.pt")
    torch.save(distilled, url)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(job_model(job), url)
    msg = str(err.value)
    assert "stripped 'student.' and stripped 'teacher.'" in msg and "model.init_prefix" in msg and "\n" not in msg
    model = job_model(job)
    report = load_pretrained(model, url, prefix="teacher")  # the final dot may be left out
    assert report.endswith("ignored (outside 'teacher.'): student.features.1.weight, student.features.1.bias, "
                           "student.head.weight, student.head.bias; format: state_dict; keys: stripped 'teacher.'")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in teacher.items())


def test_explicit_prefix_is_applied_as_given(tmp_path):
    job = write_job(tmp_path, base=JOB)
    torch.save(source_weights(job), tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"model.init_prefix: no key of .*w.pt starts with 'net\.'"):
        load_pretrained(job_model(job), str(tmp_path / "w.pt"), prefix="net.")
    model = Wrapped(job_model(job))  # "" keeps the keys as saved, though adding 'backbone.' would fit
    with pytest.raises(CheckpointError, match="missing backbone.features.1.weight"):
        load_pretrained(model, str(tmp_path / "w.pt"), prefix="", new_head="fc")
    assert load_pretrained(model, str(tmp_path / "w.pt"), prefix="+backbone.", new_head="fc").endswith(
        "keys: added 'backbone.'")


class MarkerOnLoad:
    """Hyper-parameters object whose unpickling creates a file: stands in for code an attacker would run."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __setstate__(self, state):
        self.__dict__.update(state)
        Path(self.path).touch()


def test_lightning_hyper_parameters_object_is_refused_without_running_it(tmp_path, capsys, one_thread):
    job = write_job(tmp_path, base=JOB)
    proof = tmp_path / "proof"
    torch.load(lightning_file(tmp_path, source_weights(job), {"cfg": MarkerOnLoad(proof)}), weights_only=False)
    assert proof.exists()  # the object does work when unpickled unsafely...
    marker = tmp_path / "marker"
    path = lightning_file(tmp_path, source_weights(job), {"cfg": MarkerOnLoad(marker), "lr": 0.01})
    job = write_job(tmp_path, base=JOB, model={"init_from": str(path)})
    assert cli.main(["train", str(job)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"contains a pickled Python object ({MarkerOnLoad.__module__}.MarkerOnLoad)" in err
    assert "torch.save(ckpt['state_dict'], path)" in err and "model.trust_pickle: true" in err
    assert not marker.exists()  # ...but the refusal never executed it


# ---------------------------------------------------------------- export --checkpoint, ckpt ls

VAL_LOSS = {1: 0.9, 2: 0.3, 3: 0.5, 4: 0.7}  # the best (lowest) is not the newest


@pytest.fixture
def store_job(tmp_path):
    """A job whose checkpoint.dir holds 4 checkpoints (retention off), each with its own weights and val_loss."""
    job = write_job(tmp_path, base=JOB, checkpoint={"metric": "val_loss", "mode": "min", "keep_last": 0})
    cfg = load_config(job)
    store = CheckpointStore(cfg.checkpoint_dir)
    weights = {}
    for step, loss in VAL_LOSS.items():
        weights[step] = source_weights(job, seed=step)
        state = tmp_path / "state.pt"
        torch.save({"model": weights[step]}, state)
        store.commit(step, {"state.pt": state.read_bytes()},
                     {"epoch": step, "metrics": {"val_loss": loss},
                      "config": {"checkpoint": {"metric": "val_loss", "mode": "min"}}})
    return job, weights


def exported(capsys, job: Path, out: Path, *choice: str) -> dict:
    assert cli.main(["export", str(job), str(out), *choice]) == 0
    assert "exported" in capsys.readouterr().out
    return torch.load(out, weights_only=True)


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_best_picks_the_best_metric_not_the_newest(store_job, tmp_path, capsys):
    job, weights = store_job
    assert equal(exported(capsys, job, tmp_path / "best.pt", "--checkpoint", "best"), weights[2])
    assert equal(exported(capsys, job, tmp_path / "newest.pt"), weights[4])
    assert equal(exported(capsys, job, tmp_path / "s3.pt", "--checkpoint", "step-3"), weights[3])
    maximise = write_job(tmp_path, "max", base=JOB, checkpoint={"dir": load_config(job).checkpoint_dir,
                                                                "metric": "val_loss", "mode": "max"})
    assert equal(exported(capsys, maximise, tmp_path / "max.pt", "--checkpoint", "best"), weights[1])


def test_export_best_without_a_metric_is_a_one_line_error(store_job, tmp_path, capsys):
    job, _ = store_job
    bare = write_job(tmp_path, "bare", base=JOB, checkpoint={"dir": load_config(job).checkpoint_dir})
    assert cli.main(["export", str(bare), str(tmp_path / "x.pt"), "--checkpoint", "best"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint.metric" in err and "checkpoint.metric=val_loss" in err and err.count("\n") == 1


def status_of(listing: str) -> dict[int, str]:
    return {int(cells[0]): cells[-1] for line in listing.splitlines()
            if (cells := re.split(r"\s{2,}", line.strip()))[0].isdigit()}


def test_ckpt_ls_marks_the_best(store_job, capsys):
    ckpt_dir = load_config(store_job[0]).checkpoint_dir
    assert cli.main(["ckpt", "ls", ckpt_dir]) == 0  # ranked as the checkpoints' own config says
    assert status_of(capsys.readouterr().out) == {1: "valid", 2: "valid, best val_loss (min)", 3: "valid",
                                                  4: "valid"}
    assert cli.main(["ckpt", "ls", ckpt_dir, "--metric", "val_loss", "--mode", "max"]) == 0
    assert status_of(capsys.readouterr().out)[1] == "valid, best val_loss (max)"


def test_checkpoint_written_by_lightning_itself(tmp_path, one_thread):
    lightning = pytest.importorskip("lightning")
    job = write_job(tmp_path, base=JOB)

    class Classifier(lightning.LightningModule):
        def __init__(self, lr: float = 0.1, hidden: int = 16):
            super().__init__()
            self.save_hyperparameters()  # hyper_parameters in the .ckpt, as most Lightning projects have
            self.model = job_model(job)

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,)))
    trainer = lightning.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    module = Classifier()
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    trainer.save_checkpoint(tmp_path / "real.ckpt")
    model = job_model(job)
    report = load_pretrained(model, str(tmp_path / "real.ckpt"))
    assert report.endswith("format: Lightning checkpoint 'state_dict'; keys: stripped 'model.'")
    assert equal(model.state_dict(), module.model.state_dict())
