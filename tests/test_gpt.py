"""The built-in decoder-only transformer (`model.name: gpt`) and byte-level text data (`data.name: text`):
windows and their split, any fsspec URL, the standard library's own source, causality, and a job that learns."""
import json
import sysconfig

import fsspec
import pytest
import torch

from runner.config import DataConfig, ModelConfig
from runner.components import build_model
from runner.data import build_datasets
from runner.errors import ConfigError
from helpers import ok, run_cli, write_job


def test_text_windows_predict_the_next_byte_and_split_by_position(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(bytes(range(100)))
    data = build_datasets(DataConfig(name="text", args={"path": str(path), "context": 8, "val_fraction": 0.2}))
    assert (data.num_classes, data.input_shape, len(data.train), len(data.val)) == (256, (8,), 9, 2)
    x, y = data.train[3]
    assert x.tolist() == list(range(24, 32)) and y.tolist() == list(range(25, 33))
    assert data.val[0][0].tolist() == list(range(80, 88))  # the last 20 bytes, none seen in training
    assert max(int(data.train[i][1].max()) for i in range(len(data.train))) < 80


def test_text_reads_fsspec_urls_and_the_standard_library(tmp_path):
    with fsspec.open("memory://corpus/a.txt", "wb") as f:
        f.write(b"hello world " * 50)
    from_url = build_datasets(DataConfig(name="text", args={"path": "memory://corpus/a.txt", "context": 16}))
    assert bytes(from_url.train[0][0].tolist()) == b"hello world hell"
    stdlib = build_datasets(DataConfig(name="text", args={"path": "stdlib", "context": 64, "max_bytes": 100_000}))
    first = sorted(p for p in __import__("pathlib").Path(sysconfig.get_paths()["stdlib"]).glob("**/*.py"))[0]
    assert bytes(stdlib.train[0][0].tolist()) == first.read_bytes()[:64]
    assert (len(stdlib.train), len(stdlib.val)) == ((90_000 - 1) // 64, (10_000 - 1) // 64)


@pytest.mark.parametrize("args, message", [({"path": "/no/such/file.txt"}, "data.args.path: cannot read"),
                                          ({"path": "memory://tiny.txt", "context": 64}, "fewer than one")])
def test_text_errors_are_one_line(args, message):
    with fsspec.open("memory://tiny.txt", "wb") as f:
        f.write(b"short")
    with pytest.raises(ConfigError, match=message):
        build_datasets(DataConfig(name="text", args=args))


def test_gpt_is_causal_and_returns_class_scores_second():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="gpt", args={"layers": 2, "heads": 2, "width": 16}), 256, (12,)).eval()
    x = torch.randint(0, 256, (2, 12))
    changed = x.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 256
    out, out_changed = model(x), model(changed)
    assert out.shape == (2, 256, 12)
    assert torch.equal(out[..., :7], out_changed[..., :7]) and not torch.equal(out[..., 7:], out_changed[..., 7:])
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, 13, dtype=torch.long))


@pytest.mark.slow  # ~15 s: a small transformer learns bytes of Python source
def test_a_gpt_job_on_the_standard_library_learns(tmp_path):
    job = write_job(tmp_path, model={"name": "gpt", "args": {"layers": 2, "heads": 2, "width": 32}},
                    data={"name": "text", "batch_size": 16,
                          "args": {"path": "stdlib", "context": 32, "max_bytes": 60_000}},
                    optim={"name": "AdamW", "lr": 3e-3}, train={"max_epochs": 2})
    ok(run_cli("train", job))
    history = [json.loads(line) for line in (tmp_path / "job" / "metrics.jsonl").read_text().splitlines()]
    first, last = history[0], history[-1]
    assert last["val_loss"] < first["val_loss"] < 5.6  # below log(256) = 5.55 + noise: it learned bytes
    assert abs(last["val_loss"] - last["train_loss"]) < 1.0  # one scale: both are mean per-token losses
    assert 0.1 < last["val_acc"] < 1 and 0 < last["train_acc"] < 1  # per-token accuracy


@pytest.mark.slow
def test_the_gpt_example_trains_as_documented(tmp_path):
    """examples/gpt.yaml with the README's laptop overrides and a few steps: the file is a valid job."""
    out = ok(run_cli("train", "examples/gpt.yaml", f"out_dir={tmp_path / 'gpt'}", "model.args.layers=1",
                     "model.args.width=32", "data.args.max_bytes=200000", "train.max_steps=3",
                     "scheduler.args.total_steps=3"))
    assert "done: 3 steps" in out
