"""Names in a job file → models, datasets, losses, optimizers, schedulers; the sharded resumable sampler."""
import argparse
import csv
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from runner.cli import load_job
from runner.components import build_loss, build_model, build_optimizer, build_scheduler
from runner.config import DataConfig, ModelConfig, OptimConfig, SchedulerConfig
from runner.data import ShardedSampler, build_datasets
from runner.errors import ConfigError
from runner.models import MLP, SmallCNN
from helpers import REPO, TINY_JOB, ok, run_cli, write_job


@pytest.fixture
def clean_imports(tmp_path, monkeypatch):
    """Restore sys.path and forget the modules a test imported from its tmp folder."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


def config_error(fn, *args) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    return str(info.value)


def write_module(folder: Path, name: str, source: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


# --- models -------------------------------------------------------------------------------------------------

def test_builtin_cnn_takes_classes_and_channels_from_the_data():
    model = build_model(ModelConfig(name="cnn", args={"width": 4}), 5, (3, 12, 12))
    assert isinstance(model, SmallCNN) and model.features[0].in_channels == 3
    assert model(torch.zeros(2, 3, 12, 12)).shape == (2, 5)
    explicit = build_model(ModelConfig(name="cnn", num_classes=7), 5, (1, 8, 8))  # model.num_classes wins
    assert explicit(torch.zeros(1, 1, 8, 8)).shape == (1, 7)


def test_builtin_mlp_flattens_any_input_shape():
    model = build_model(ModelConfig(name="mlp", args={"hidden": [6, 5]}), 3, (2, 4, 4))
    assert isinstance(model, MLP) and model.features[1].in_features == 32
    assert model(torch.zeros(4, 2, 4, 4)).shape == (4, 3)


def test_builtin_model_needs_a_class_count_for_regression_data():
    assert "model.num_classes" in config_error(build_model, ModelConfig(name="mlp"), None, (3,))


def test_torchvision_model_by_name_with_num_classes():
    model = build_model(ModelConfig(name="torchvision.resnet18"), 7, (3, 32, 32))
    assert model.fc.out_features == 7
    assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 7)


def test_unknown_torchvision_model_lists_them():
    message = config_error(build_model, ModelConfig(name="torchvision.resnet19"), 10, (3, 32, 32))
    assert "model.name" in message and "did you mean 'torchvision.resnet18'" in message
    message = config_error(build_model, ModelConfig(name="torchvision.resnet18", args={"depth": 3}), 10, (3, 8, 8))
    assert "torchvision.resnet18" in message and "depth" in message


def test_unknown_model_lists_available():
    message = config_error(build_model, ModelConfig(name="cnnn"), 10, (1, 8, 8))
    assert "model.name" in message and "did you mean 'cnn'" in message
    assert "cnn, gpt, mlp" in message and "torchvision.<model>" in message and "pkg.module:Name" in message


USER_MODELS = """
    from torch import nn

    class Net(nn.Module):
        def __init__(self, width=3, num_classes=2):
            super().__init__()
            self.fc = nn.Linear(64, width)
            self.out = nn.Linear(width, num_classes)

        def forward(self, x):
            return self.out(self.fc(x.flatten(1)))

    def make_net(width):
        return Net(width=width, num_classes=4)
"""


def test_user_model_next_to_the_job_file(tmp_path, clean_imports):
    """The CLI puts the job file's folder on sys.path, so `jobmodels:Net` imports from any cwd."""
    folder = tmp_path / "jobdir"
    write_module(folder, "jobmodels_a", USER_MODELS)
    job = write_job(folder, base={**TINY_JOB, "model": {"name": "jobmodels_a:Net", "args": {"width": 5}}})
    cfg = load_job(argparse.Namespace(job=str(job), overrides=[]))
    model = build_model(cfg.model, 10, (1, 8, 8))
    assert type(model).__name__ == "Net" and model.fc.out_features == 5
    factory = build_model(ModelConfig(name="jobmodels_a:make_net", args={"width": 2}), 10, (1, 8, 8))
    assert factory(torch.zeros(3, 1, 8, 8)).shape == (3, 4)


def test_user_model_from_pythonpath(tmp_path):
    """A module on PYTHONPATH, the job file elsewhere, run from a third folder: `runner summary` builds it."""
    write_module(tmp_path / "lib", "pathmodels_b", USER_MODELS)
    (tmp_path / "jobs").mkdir()
    (tmp_path / "cwd").mkdir()
    model = {"name": "pathmodels_b:Net", "args": {"width": 5}, "num_classes": 3}
    job = write_job(tmp_path / "jobs", base={**TINY_JOB, "model": model})
    out = ok(run_cli("summary", job, cwd=tmp_path / "cwd",
                     env={"PYTHONPATH": f"{tmp_path / 'lib'}{os.pathsep}{REPO}", "OMP_NUM_THREADS": 1}))
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    assert rows["fc"][1] == "Linear" and "".join(rows["fc"][2:4]) == "[-1,5]"
    assert rows["out"][1] == "Linear" and "".join(rows["out"][2:4]) == "[-1,3]"  # model.num_classes reaches it


def test_user_model_gets_the_class_count(tmp_path, clean_imports):
    """model.num_classes (or the dataset's class count) is passed to a user model that takes num_classes."""
    write_module(tmp_path, "usermodels_e", USER_MODELS)
    sys.path.insert(0, str(tmp_path))
    from_data = build_model(ModelConfig(name="usermodels_e:Net"), 10, (1, 8, 8))
    assert from_data.out.out_features == 10
    explicit = build_model(ModelConfig(name="usermodels_e:Net", num_classes=3), 10, (1, 8, 8))
    assert explicit.out.out_features == 3
    in_args = build_model(ModelConfig(name="usermodels_e:Net", args={"num_classes": 6}, num_classes=3), 10, (1,))
    assert in_args.out.out_features == 6  # args are the user's last word
    factory = build_model(ModelConfig(name="usermodels_e:make_net", args={"width": 2}), 10, (1, 8, 8))
    assert factory.out.out_features == 4  # a factory without num_classes is called with its args only


def test_user_model_import_errors_name_the_key(tmp_path, clean_imports):
    message = config_error(build_model, ModelConfig(name="no_such_module_xyz:Net"), 10, (1, 8, 8))
    assert "model.name" in message and "no_such_module_xyz" in message and "PYTHONPATH" in message
    write_module(tmp_path, "usermodels_c", USER_MODELS)
    sys.path.insert(0, str(tmp_path))
    message = config_error(build_model, ModelConfig(name="usermodels_c:Nett"), 10, (1, 8, 8))
    assert "model.name" in message and "'Nett'" in message
    message = config_error(build_model, ModelConfig(name="usermodels_c:Net", args={"depth": 2}), 10, (1, 8, 8))
    assert "model.args" in message and "depth" in message


# --- losses, optimizers, schedulers ---------------------------------------------------------------------------

def test_losses_by_name_and_unknown_loss():
    assert isinstance(build_loss("cross_entropy"), nn.CrossEntropyLoss)
    assert isinstance(build_loss("mse"), nn.MSELoss)
    assert isinstance(build_loss("torch.nn:HuberLoss"), nn.HuberLoss)
    message = config_error(build_loss, "crossentropy")
    assert "train.loss" in message and "did you mean 'cross_entropy'" in message and "mse" in message


def params() -> list[dict]:
    return [{"params": [nn.Parameter(torch.zeros(2))]}]


def test_any_torch_optimizer_by_class_name():
    opt = build_optimizer(OptimConfig(name="SGD", lr=0.5, args={"momentum": 0.9, "nesterov": True}), params())
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["nesterov"] is True
    assert isinstance(build_optimizer(OptimConfig(name="RMSprop"), params()), torch.optim.RMSprop)
    assert isinstance(build_optimizer(OptimConfig(name="torch.optim:Adagrad"), params()), torch.optim.Adagrad)


def test_unknown_optimizer_lists_available():
    message = config_error(build_optimizer, OptimConfig(name="Adamm"), params())
    assert "optim.name" in message and "did you mean 'Adam'" in message
    assert all(name in message for name in ("AdamW", "SGD", "RMSprop"))
    assert "Optimizer," not in message  # the base class is not a choice


def test_bad_optimizer_arguments_name_optim_args():
    message = config_error(build_optimizer, OptimConfig(name="SGD", args={"momentun": 0.9}), params())
    assert "optim.args" in message and "momentun" in message
    message = config_error(build_optimizer, OptimConfig(name="SGD", lr=-1.0), params())
    assert "optim.args" in message and "-1" in message


def test_schedulers_by_class_name():
    opt = build_optimizer(OptimConfig(name="SGD", lr=1.0), params())
    assert build_scheduler(SchedulerConfig(), opt) is None
    sched = build_scheduler(SchedulerConfig(name="StepLR", args={"step_size": 1, "gamma": 0.5}), opt)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5
    plateau = build_scheduler(SchedulerConfig(name="ReduceLROnPlateau"), opt)
    assert isinstance(plateau, torch.optim.lr_scheduler.ReduceLROnPlateau)


def test_unknown_scheduler_and_bad_arguments():
    opt = build_optimizer(OptimConfig(name="SGD"), params())
    message = config_error(build_scheduler, SchedulerConfig(name="StepLRR"), opt)
    assert "scheduler.name" in message and "did you mean 'StepLR'" in message and "CosineAnnealingLR" in message
    message = config_error(build_scheduler, SchedulerConfig(name="StepLR"), opt)  # step_size is required
    assert "scheduler.args" in message and "step_size" in message


# --- datasets -----------------------------------------------------------------------------------------------

def test_digits_is_the_real_sklearn_set_with_a_deterministic_split():
    from sklearn.datasets import load_digits

    data = build_datasets(DataConfig(name="digits"))
    assert len(data.train) + len(data.val) == 1797 == len(load_digits().target)
    assert len(data.val) == round(1797 * 0.2)
    assert data.num_classes == 10 and data.input_shape == (1, 8, 8)
    again = build_datasets(DataConfig(name="digits"))
    assert torch.equal(data.train.tensors[0], again.train.tensors[0])
    assert torch.equal(data.val.tensors[1], again.val.tensors[1])
    other = build_datasets(DataConfig(name="digits", args={"split_seed": 1}))
    assert not torch.equal(data.val.tensors[1], other.val.tensors[1])
    # train and val are disjoint and together are the whole set (pixel sums per class match sklearn)
    x = torch.cat([data.train.tensors[0], data.val.tensors[0]])
    y = torch.cat([data.train.tensors[1], data.val.tensors[1]])
    bunch = load_digits()
    for digit in (0, 9):
        expected = torch.tensor(bunch.data[bunch.target == digit]).sum() / 16
        assert torch.isclose(x[y == digit].sum().double(), expected, rtol=1e-6)


def test_digits_class_filter_remaps_labels():
    from sklearn.datasets import load_digits

    data = build_datasets(DataConfig(name="digits", args={"classes": [7, 3], "val_fraction": 0.25}))
    bunch = load_digits()
    x = torch.cat([data.train.tensors[0], data.val.tensors[0]])
    y = torch.cat([data.train.tensors[1], data.val.tensors[1]])
    assert data.num_classes == 2 and set(y.tolist()) == {0, 1}
    for label, digit in enumerate([7, 3]):  # label = position in `classes`
        assert int((y == label).sum()) == int((bunch.target == digit).sum())
        expected = torch.tensor(bunch.data[bunch.target == digit]).sum() / 16
        assert torch.isclose(x[y == label].sum().double(), expected, rtol=1e-6)
    flat = build_datasets(DataConfig(name="digits", args={"flatten": True}))
    assert flat.input_shape == (64,) and flat.train[0][0].shape == (64,)


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def table(n: int = 20) -> list[dict]:
    return [{"a": i, "b": i * 0.5, "species": ["dog", "cat", "emu"][i % 3], "price": 2.0 * i + 1} for i in range(n)]


def test_csv_classification(tmp_path):
    path = write_csv(tmp_path / "t.csv", table())
    data = build_datasets(DataConfig(name="csv", args={"path": str(path), "target": "species",
                                                       "features": ["a", "b"], "val_fraction": 0.25}))
    assert data.num_classes == 3 and data.input_shape == (2,)
    assert len(data.train) == 15 and len(data.val) == 5
    names = sorted({"dog", "cat", "emu"})  # labels are the sorted class names' indices
    for x, y in list(data.train) + list(data.val):
        a = int(x[0])
        assert x[1] == a * 0.5 and y.dtype == torch.long
        assert names[int(y)] == ["dog", "cat", "emu"][a % 3]


def test_csv_regression_uses_all_other_columns_by_default(tmp_path):
    path = write_csv(tmp_path / "t.csv", [{k: v for k, v in r.items() if k != "species"} for r in table()])
    data = build_datasets(DataConfig(name="csv", args={"path": str(path), "target": "price", "task": "regression"}))
    assert data.num_classes is None and data.input_shape == (2,)
    for x, y in data.train:
        assert y.shape == (1,) and y.dtype == torch.float32 and float(y) == 2.0 * float(x[0]) + 1


def test_csv_errors_name_the_option(tmp_path):
    path = write_csv(tmp_path / "t.csv", table())
    message = config_error(build_datasets, DataConfig(name="csv", args={"path": str(path), "target": "colour"}))
    assert "data.args.target" in message and "'colour'" in message and "species" in message
    message = config_error(build_datasets, DataConfig(name="csv", args={"path": str(path), "target": "price"}))
    assert "data.args.features" in message  # 'species' is not numeric
    message = config_error(build_datasets, DataConfig(name="csv", args={"path": str(tmp_path / "x.csv"),
                                                                         "target": "y"}))
    assert "data.args.path" in message and "x.csv" in message
    message = config_error(build_datasets, DataConfig(name="csv", args={"target": "y"}))
    assert "data.args" in message and "path" in message


def test_imagefolder(tmp_path):
    from PIL import Image

    for split, count in (("train", 3), ("val", 1)):
        for cls, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (10, 12), colour).save(folder / f"{i}.png")
    data = build_datasets(DataConfig(name="imagefolder", args={"root": str(tmp_path / "train"),
                                                               "val_root": str(tmp_path / "val"), "size": 8}))
    assert data.num_classes == 2 and data.input_shape == (3, 8, 8)
    assert len(data.train) == 6 and len(data.val) == 2
    x, y = data.train[0]
    assert x.shape == (3, 8, 8) and y == 0 and x[0].mean() > x[2].mean()  # cat: red after normalization
    x, y = data.val[1]
    assert y == 1 and x[2].mean() > x[0].mean()
    message = config_error(build_datasets, DataConfig(name="imagefolder", args={"root": str(tmp_path / "none")}))
    assert "data.args.root" in message


def test_synthetic_is_seeded_and_learnable_shape():
    cfg = DataConfig(name="synthetic", args={"shape": [2, 3], "num_classes": 4, "size": 40, "val_size": 8})
    data = build_datasets(cfg)
    assert len(data.train) == 40 and len(data.val) == 8
    assert data.input_shape == (2, 3) and data.num_classes == 4
    assert data.train[0][0].shape == (2, 3) and 0 <= int(data.train.tensors[1].max()) < 4
    assert torch.equal(build_datasets(cfg).train.tensors[0], data.train.tensors[0])
    other = build_datasets(DataConfig(name="synthetic", args={**cfg.args, "seed": 1}))
    assert not torch.equal(other.train.tensors[0], data.train.tensors[0])


def test_user_dataset_by_import_path(tmp_path, clean_imports):
    write_module(tmp_path, "userdata_d", """
        import torch
        from torch.utils.data import TensorDataset

        class Named(TensorDataset):
            classes = ["no", "yes"]

        def pair(n=6):
            x = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)
            y = torch.arange(n) % 2
            return Named(x, y), Named(x[:2], y[:2])

        def single(n=4):
            return TensorDataset(torch.zeros(n, 5), torch.zeros(n))
    """)
    sys.path.insert(0, str(tmp_path))
    data = build_datasets(DataConfig(name="userdata_d:pair", args={"n": 8}))
    assert len(data.train) == 8 and len(data.val) == 2
    assert data.num_classes == 2 and data.input_shape == (3,)  # from `classes` and the first sample
    data = build_datasets(DataConfig(name="userdata_d:single"))
    assert data.val is None and data.num_classes is None and data.input_shape == (5,)
    message = config_error(build_datasets, DataConfig(name="userdata_d:pair", args={"m": 1}))
    assert "data.args" in message and "'m'" in message


def test_unknown_dataset_lists_available(tmp_path):
    message = config_error(build_datasets, DataConfig(name="digitz"))
    assert "data.name" in message and "did you mean 'digits'" in message
    assert all(name in message for name in ("csv", "imagefolder", "synthetic", "torchvision.<Dataset>"))
    message = config_error(build_datasets, DataConfig(name="torchvision.NoSuchSet"))
    assert "data.name" in message and "NoSuchSet" in message
    # a torchvision dataset that is not on disk: tests never download; the message says how
    message = config_error(build_datasets, DataConfig(name="torchvision.MNIST", args={"root": str(tmp_path)}))
    assert "download=true" in message and str(tmp_path) in message


# --- the sharded sampler ------------------------------------------------------------------------------------

def shards(size, world, seed=0, epoch=0, pad=False, shuffle=True) -> list[list[int]]:
    out = []
    for rank in range(world):
        sampler = ShardedSampler(size, rank, world, seed, shuffle, pad)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


@pytest.mark.parametrize("size, world", [(10, 1), (10, 3), (17, 4), (3, 4)])
def test_eval_shards_are_disjoint_and_cover_everything(size, world):
    parts = shards(size, world)
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(size))  # every sample exactly once


@pytest.mark.parametrize("size, world", [(10, 3), (17, 4), (16, 4)])
def test_train_shards_are_padded_to_equal_length(size, world):
    parts = shards(size, world, pad=True)
    per_rank = -(-size // world)
    assert all(len(part) == per_rank for part in parts)
    flat = [i for part in parts for i in part]
    assert set(flat) == set(range(size)) and len(flat) == per_rank * world
    assert len(flat) - len(set(flat)) == per_rank * world - size  # only the padding repeats


def test_start_position_skips_exactly_what_was_consumed():
    full = shards(23, 2, seed=5, epoch=3, pad=True)[1]
    sampler = ShardedSampler(23, 1, 2, 5, True, True)
    for taken in (0, 1, 7, len(full) - 1, len(full)):  # samples each rank took; the position counts all ranks'
        sampler.set_epoch(3, start=taken * 2)
        assert list(sampler) == full[taken:] and len(sampler) == len(full) - taken


@pytest.mark.parametrize("size, before, after, taken", [(23, 2, 1, 5), (23, 2, 3, 4), (40, 4, 3, 3), (9, 1, 4, 2)])
def test_another_world_size_goes_on_through_the_same_order(size, before, after, taken):
    """N ranks take `taken` samples each; M ranks resume at that global position: every sample of the epoch is
    consumed exactly once (padding aside), in the order an uninterrupted run uses."""
    order = ShardedSampler(size, 0, 1, 5, True, False)
    order.set_epoch(3)
    first = [shard[:taken] for shard in shards(size, before, seed=5, epoch=3, pad=True)]
    position = taken * before
    rest = []
    for rank in range(after):
        sampler = ShardedSampler(size, rank, after, 5, True, True)
        sampler.set_epoch(3, start=position)
        rest.append(list(sampler))
    assert len({len(r) for r in rest}) == 1  # equal steps on every rank
    consumed = sorted(i for part in first for i in part)
    assert consumed == sorted(order.order()[:position])  # the first launch consumed a prefix of the order
    dealt = [rest[r][k] for k in range(len(rest[0])) for r in range(after)]  # the global order of the rest
    assert dealt[:size - position] == order.order()[position:]
    assert sorted(consumed + dealt[:size - position]) == list(range(size))


def test_order_is_a_pure_function_of_seed_epoch_and_world_size():
    assert shards(50, 2, seed=1, epoch=2) == shards(50, 2, seed=1, epoch=2)
    assert shards(50, 2, seed=1, epoch=2) != shards(50, 2, seed=1, epoch=3)
    assert shards(50, 2, seed=1, epoch=2) != shards(50, 2, seed=2, epoch=2)
    assert shards(50, 2, seed=1)[0] != shards(50, 5, seed=1)[0]
    assert shards(50, 1, shuffle=False)[0] == list(range(50))
    # a sampler that has been iterated gives the same order again; set_epoch fully determines it
    sampler = ShardedSampler(50, 0, 1, 1, True, True)
    sampler.set_epoch(4)
    first = list(sampler)
    sampler.set_epoch(0)
    list(sampler)
    sampler.set_epoch(4)
    assert list(sampler) == first


def test_fetching_a_training_sample_leaves_the_training_rng_alone(monkeypatch):
    """Per-sample seeding (augmentation) must not disturb the RNGs that drive dropout and init —
    CUDA's included, which torch.manual_seed would reseed (and the main process cannot restore)."""
    import random

    import numpy as np

    from runner.data import SeededDataset

    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    data = build_datasets(DataConfig(name="digits", args={"augment": True}))
    ds = SeededDataset(data.train, seed=3)
    torch.manual_seed(11)
    reseeded.clear()
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    first = ds[5][0]
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert (np.random.get_state()[1] == before[2]).all()
    assert reseeded == []
    assert torch.equal(ds[5][0], first)  # the sample's randomness is a function of (seed, epoch, index)
    ds.epoch = 1
    assert not torch.equal(ds[5][0], first)


@pytest.mark.parametrize("name", ["mlp", "cnn", "gpt"])
def test_a_built_in_models_unknown_argument_is_a_config_error_naming_model_args(name):
    """A misspelled argument of a built-in model (here `widht`) is one line naming the key, not a TypeError."""
    message = config_error(build_model, ModelConfig(name=name, args={"widht": 8}), 10, (1, 8, 8))
    assert "model.args" in message and "widht" in message
