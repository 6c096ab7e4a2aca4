"""Memory and speed switches (README, "Memory and speed switches"; runner/tuning.py): activation checkpointing
recomputes each block and ends with the weights of a run without it, channels-last training resumes and exports,
fused optimizers are checked at start and switch on and off across resumes.

In process (cli.main) on tiny jobs, except the 2-rank FSDP comparison (slow).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from helpers import assert_tensors_equal, merge, newest_state, ok, run_cli, run_torchrun, text_corpus, write_job
from helpers import train_in_process as train
from runner import cli, tuning
from runner.config import load_config
from runner.dist import DistEnv
from runner.errors import ConfigError
from runner.job import build_job

# BatchNorm and dropout; 3-channel inputs, so channels-last changes the inputs' layout too. 8 steps per epoch.
CNN = {
    "model": {"name": "cnn", "args": {"width": 8, "dropout": 0.2}},
    "data": {"name": "synthetic", "args": {"shape": [3, 8, 8], "size": 256, "val_size": 64}, "batch_size": 32},
    "optim": {"name": "AdamW", "lr": 0.01},
    "train": {"max_epochs": 2, "seed": 0, "progress": "plain"},
    "preemption": {"notice": "off"},
}
# Two transformer blocks with dropout (attention and MLP): recomputation must replay the same masks.
GPT_MODEL = {"name": "gpt", "args": {"layers": 2, "heads": 2, "width": 32, "dropout": 0.1}}
GPT = {
    "model": GPT_MODEL,
    "data": {"name": "text", "batch_size": 8, "args": {"context": 32}},  # path: the corpus fixture's
    "optim": {"name": "AdamW", "lr": 3.0e-3},
    "train": {"max_epochs": 1, "max_steps": 8, "seed": 0, "progress": "plain", "log_every_steps": 4},
    "preemption": {"notice": "off"},
}
CPU = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture(autouse=True)
def quiet_env(monkeypatch, one_thread):
    for var in [v for v in os.environ if v.startswith("RUNNER_TEST_")]:
        monkeypatch.delenv(var)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return text_corpus(tmp_path_factory.mktemp("corpus"), 8_000)


def gpt_job(corpus: str) -> dict:
    return merge(GPT, {"data": {"args": {"path": corpus}}})


def trained(job: Path, *overrides, capsys) -> str:
    code, out, err = train(job, *overrides, capsys=capsys)
    assert code == 0, err[-3000:]
    return out + err


def one_line_error(job: Path, *overrides, capsys) -> str:
    code, _, err = train(job, *overrides, capsys=capsys)
    lines = err.strip().splitlines()
    assert code == 2 and lines and lines[-1].startswith("runner: error: ") and "Traceback" not in err, err[-3000:]
    return lines[-1]


def final(folder: Path, name: str) -> dict:
    return newest_state(folder / name / "checkpoints")[0]


# --- activation checkpointing ------------------------------------------------------------------------------------

def attention_calls(job: Path) -> tuple[list[str], int, int]:
    """(state_dict keys, attention forwards per block in one training step, in one no_grad forward) of the job's
    model as build_job makes it."""
    built = build_job(load_config(job), CPU)
    model, blocks = built.model, built.model.blocks
    calls = [0] * len(blocks)
    for i, block in enumerate(blocks):
        block.attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    x, y = (torch.stack(t) for t in zip(*(built.data.train[i] for i in range(4))))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    in_training = set(calls)
    calls[:] = [0] * len(blocks)
    with torch.no_grad():
        model.eval()(x)
    (per_step,), (per_eval,) = in_training, set(calls)
    return list(model.state_dict()), per_step, per_eval


def test_each_block_recomputes_its_forward_in_backward_and_keeps_its_state_dict_keys(tmp_path, corpus):
    plain = attention_calls(write_job(tmp_path, "plain", base=gpt_job(corpus)))
    recomputed = attention_calls(write_job(tmp_path, "ac", base=gpt_job(corpus),
                                           train={"activation_checkpointing": True}))
    assert plain[1:] == (1, 1) and recomputed[1:] == (2, 1)  # backward ran each block again; evaluation did not
    assert recomputed[0] == plain[0] and not any("checkpoint" in key for key in recomputed[0])


@pytest.mark.parametrize("model", ["gpt", "cnn"])
def test_a_run_with_activation_checkpointing_ends_with_the_weights_of_a_run_without_it(tmp_path, capsys, corpus,
                                                                                        model):
    """Bit for bit: recomputation replays dropout's masks (checkpoint restores the RNG), and the CNN's BatchNorm
    counts each batch once in its running statistics (no second update while backward recomputes)."""
    base = gpt_job(corpus) if model == "gpt" else CNN
    trained(write_job(tmp_path, "plain", base=base), capsys=capsys)
    out = trained(write_job(tmp_path, "ac", base=base, train={"activation_checkpointing": True}), capsys=capsys)
    blocks = "2 block(s) (Block)" if model == "gpt" else "2 block(s) (Linear, Sequential)"
    assert f"activation checkpointing: {blocks} recompute their activations in backward" in out, out[-3000:]
    plain, recomputed = final(tmp_path, "plain"), final(tmp_path, "ac")
    for section in ("model", "optimizer"):
        assert_tensors_equal(plain[section], recomputed[section], section)  # keys included
    assert (tmp_path / "plain" / "metrics.jsonl").read_text() == (tmp_path / "ac" / "metrics.jsonl").read_text()


@pytest.mark.slow  # two compiled runs
def test_activation_checkpointing_composes_with_compile(tmp_path):
    """Compiled, the recomputation is the backward graph's own (dynamo cannot trace the eager form's context_fn):
    BatchNorm still counts each batch once, and the run ends within float rounding of a compiled run without it.
    SGD, so that the conv biases before BatchNorm (gradient zero up to rounding) are not moved by Adam's scaling."""
    base = merge(CNN, {"optim": {"name": "SGD", "lr": 0.05}, "train": {"compile": True, "max_epochs": 1,
                                                                      "max_steps": 4}})
    for name, recompute in (("plain", False), ("ac", True)):
        job = write_job(tmp_path, name, base=base, train={"activation_checkpointing": recompute})
        ok(run_cli("train", job, env={"OMP_NUM_THREADS": 1}))
    plain, recomputed = final(tmp_path, "plain"), final(tmp_path, "ac")
    assert plain["model"].keys() == recomputed["model"].keys()
    for key, value in plain["model"].items():
        torch.testing.assert_close(recomputed["model"][key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_activation_checkpointing_on_a_model_without_blocks_is_a_one_line_config_error(tmp_path, capsys):
    linear = {**CNN, "model": {"name": "torch.nn:Linear", "args": {"in_features": 8, "out_features": 4}}}
    job = write_job(tmp_path, base=linear, data={"args": {"shape": [8], "num_classes": 4}},
                    train={"activation_checkpointing": True})
    line = one_line_error(job, capsys=capsys)
    assert "train.activation_checkpointing: Linear has no blocks to recompute" in line, line
    assert not (tmp_path / "job" / "checkpoints").exists()


@pytest.mark.slow  # two 2-rank launches, ~35 s on 2 cores
def test_activation_checkpointing_under_fsdp_ends_with_the_weights_of_a_sharded_run_without_it(tmp_path, corpus):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from runner.components import build_model
    from runner.config import ModelConfig
    from runner.store import CheckpointStore, sharded

    def whole_model(name: str) -> dict:
        store = CheckpointStore(str(tmp_path / name / "checkpoints"))
        model = build_model(ModelConfig(**GPT_MODEL), 256, (32,))
        target = dict(zip(("model", "optimizer"), get_state_dict(model, torch.optim.AdamW(model.parameters()))))
        sharded.load_shards(store, store.latest_valid(), target)
        return target

    base = merge(gpt_job(corpus), {"dist": {"strategy": "fsdp"}, "train": {"max_steps": 6}})
    ok(run_torchrun("train", write_job(tmp_path, "plain", base=base)))
    out = ok(run_torchrun("train", write_job(tmp_path, "ac", base=base, train={"activation_checkpointing": True})))
    assert "activation checkpointing: 2 block(s) (Block)" in out and "files from 2 rank(s)" in out, out[-3000:]
    plain, recomputed = whole_model("plain"), whole_model("ac")
    assert_tensors_equal(plain["model"], recomputed["model"], "model")


# --- channels last -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("optim_args", [{}, {"fused": True}], ids=["adamw", "fused-adamw"])
def test_a_channels_last_run_resumes_after_a_crash_to_the_weights_of_an_uninterrupted_one(tmp_path, capsys,
                                                                                          monkeypatch, optim_args):
    """Checkpoints hold contiguous copies; the resumed optimizer's moments take their channels-last parameter's
    layout again (fused AdamW on CPU reads them in memory order: a moment left contiguous trains wrong numbers)."""
    sections = {"train": {"channels_last": True}, "optim": {"args": optim_args},
                "checkpoint": {"every_steps": 4, "keep_last": 0}}
    out = trained(write_job(tmp_path, "straight", base=CNN, **sections), capsys=capsys)
    assert "channels_last: 4-D parameters and inputs in channels-last memory format" in out, out[-3000:]
    job = write_job(tmp_path, "crashed", base=CNN, **sections)
    monkeypatch.setenv("RUNNER_TEST_FAIL_AT_STEP", "10")
    monkeypatch.setenv("RUNNER_TEST_FAULT_ONCE", str(tmp_path / "fired"))
    code, _, err = train(job, capsys=capsys)
    assert str(code).startswith("crash"), err[-3000:]
    assert "resuming from" in trained(job, capsys=capsys)
    straight, resumed = final(tmp_path, "straight"), final(tmp_path, "crashed")
    for section in ("model", "optimizer"):
        assert_tensors_equal(straight[section], resumed[section], section)


def test_a_channels_last_checkpoint_exports_to_safetensors_and_pt_that_load_into_a_plain_model(tmp_path, capsys):
    import safetensors.torch

    job = write_job(tmp_path, base=CNN, train={"channels_last": True, "max_epochs": 1})
    trained(job, capsys=capsys)
    saved = final(tmp_path, "job")["model"]
    for name, load in (("model.safetensors", safetensors.torch.load_file),
                       ("model.pt", lambda path: torch.load(path, weights_only=True))):
        assert cli.main(["export", str(job), str(tmp_path / name)]) == 0
        exported = load(str(tmp_path / name))
        plain = cli.model_from_job(load_config(job))[0]  # contiguous, as inference code builds it
        plain.load_state_dict(exported)
        assert_tensors_equal(plain.state_dict(), saved, name)
        assert all(t.is_contiguous() for t in exported.values()), name


def test_channels_last_on_a_model_without_convolutions_warns_that_it_changes_nothing(tmp_path, capsys):
    mlp = {**CNN, "model": {"name": "mlp", "args": {"hidden": [16]}}}
    job = write_job(tmp_path, base=mlp, train={"channels_last": True, "max_steps": 2})
    code, out, err = train(job, capsys=capsys)
    assert code == 0, err[-3000:]
    warnings = [line for line in err.splitlines() if "WARNING" in line and "channels_last" in line]
    assert warnings == ["[runner] WARNING: train.channels_last: MLP has no Conv2d layer, so channels-last memory "
                        "format changes nothing here; left as it is"], err[-3000:]
    assert "4-D parameters and inputs in channels-last" not in out


def test_channels_last_under_fsdp_on_several_ranks_is_refused_naming_both_keys(tmp_path):
    cfg = load_config(write_job(tmp_path, base=CNN, train={"channels_last": True}, dist={"strategy": "fsdp"}))
    model = cli.model_from_job(cfg)[0]
    with pytest.raises(ConfigError, match=r"^train.channels_last: FSDP2 \(dist.strategy: fsdp\) shards only "
                                          r"contiguous parameters") as refused:
        tuning.apply(model, cfg, DistEnv(rank=0, local_rank=0, world_size=2, device=torch.device("cpu")))
    assert "\n" not in str(refused.value)


# --- fused and foreach optimizers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("optim, expected", [
    ({"name": "RMSprop", "args": {"fused": True}},
     "optim.args.fused: RMSprop has no fused implementation (it takes no `fused` argument); remove optim.args.fused; "
     "torch.optim's with one: Adagrad, Adam, AdamW, SGD"),
    ({"name": "AdamW", "args": {"fused": True, "foreach": True}},
     "optim.args.fused: AdamW refuses it (RuntimeError: `fused` and `foreach` cannot be `True` together.)"),
    ({"name": "LBFGS", "args": {"foreach": True}},
     "optim.args.foreach: LBFGS has no foreach implementation (it takes no `foreach` argument)"),
], ids=["no-fused-argument", "fused-and-foreach", "no-foreach-argument"])
def test_an_unsupported_fused_or_foreach_switch_is_a_one_line_config_error_at_start(tmp_path, capsys, optim,
                                                                                     expected):
    line = one_line_error(write_job(tmp_path, base=CNN, optim=optim), capsys=capsys)
    assert line.startswith(f"runner: error: {expected}"), line
    assert not (tmp_path / "job" / "checkpoints").exists()  # refused before anything trained


def implementation(folder: Path) -> list:
    """The `fused` switch of each parameter group the newest checkpoint's optimizer stepped with."""
    return [group["fused"] for group in final(folder, "job")["optimizer"]["param_groups"]]


def test_fused_adamw_trains_and_the_switch_follows_the_job_across_resumes(tmp_path, capsys):
    """optim.args.fused is free for drift and applied on resume: torch's load_state_dict alone would keep the
    saved groups' switch, so a run saved unfused would go on unfused."""
    job = write_job(tmp_path, base=CNN, train={"max_steps": 4})
    trained(job, capsys=capsys)
    assert implementation(tmp_path) == [None]  # torch's default: not fused on CPU
    out = trained(job, "optim.args.fused=true", "train.max_steps=8", capsys=capsys)
    assert "resuming from" in out and "step-000000004: step 4" in out, out[-3000:]
    assert implementation(tmp_path) == [True]
    out = trained(job, "optim.args.fused=false", "train.max_steps=12", capsys=capsys)
    assert "step-000000008: step 8" in out and implementation(tmp_path) == [False]
    trained(write_job(tmp_path, "unfused", base=CNN, train={"max_steps": 12}), capsys=capsys)
    switched, unfused = losses(tmp_path / "job"), losses(tmp_path / "unfused")
    assert len(switched) == 2 and switched == pytest.approx(unfused, rel=1e-4)  # the same math, other rounding


def losses(out_dir: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
