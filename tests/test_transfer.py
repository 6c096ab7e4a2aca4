"""Transfer learning end to end: the two-stage digits example through the CLI, a phase change under 2-rank
DDP, a killed fine-tune resumed bit-exactly, torchvision resnet18 from a state_dict file, refusals, summary.

The unit tests of runner/finetune.py are in test_finetune.py; here everything goes through `runner`.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from runner import cli
from runner.store import CheckpointStore
from runner.config import load_config
from runner.models import SmallCNN
from helpers import REPO, assert_tensors_equal, ok, run_cli, run_torchrun, write_job  # noqa: F401

PRETRAIN = REPO / "examples" / "pretrain-digits.yaml"
FINETUNE = REPO / "examples" / "finetune-digits.yaml"
ONE_THREAD = {"OMP_NUM_THREADS": 1}  # 2 shared cores: more threads only oversubscribe them


def states(ckpt_dir) -> dict[int, tuple[dict, dict]]:
    """step → (state, manifest) of every valid checkpoint in a store."""
    store = CheckpointStore(str(ckpt_dir))
    return {info.step: (torch.load(io.BytesIO(store.read(info)), map_location="cpu", weights_only=True),
                        info.manifest) for info in store.list() if info.valid}


def at_epoch(ckpts: dict, epoch: int) -> dict:
    """The state saved at the end of `epoch` epochs."""
    [state] = [s for s, m in ckpts.values() if m["epoch"] == epoch and m["sample_in_epoch"] == 0]
    return state


def differing(a: dict, b: dict, keys) -> list[str]:
    return [k for k in keys if not torch.equal(a[k], b[k])]


def final_val_acc(out_dir: Path) -> float:
    return json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[-1])["val_acc"]


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("runner: error: "), captured.out[-2000:] + err
    return err


# ---------------------------------------------------------------- 1. the shipped two-stage example

@pytest.mark.slow
def test_pretrain_then_finetune_example_beats_training_from_scratch(tmp_path):
    pre_dir, ft_dir, scratch_dir = tmp_path / "pretrain", tmp_path / "finetune", tmp_path / "scratch"
    ok(run_cli("train", PRETRAIN, f"out_dir={pre_dir}", env=ONE_THREAD))
    pre_url = CheckpointStore(str(pre_dir / "checkpoints")).latest_valid().url
    # the example starts from the pretrain job's checkpoint store: its newest valid checkpoint is taken
    assert load_config(FINETUNE).model.init_from == load_config(PRETRAIN).checkpoint_dir

    out = ok(run_cli("train", FINETUNE, f"model.init_from={pre_dir / 'checkpoints'}", f"out_dir={ft_dir}",
                     "checkpoint.keep_last=0", env=ONE_THREAD))
    assert "loaded 21/21 tensors from" in out and "missing: none; unexpected: none; new head: head" in out
    pretrained = states(pre_dir / "checkpoints")[int(pre_url.rsplit("-", 1)[1])][0]["model"]
    backbone = [k for k in pretrained if not k.startswith("head.")]
    assert any("running_mean" in k for k in backbone)  # BatchNorm statistics are part of the check
    ckpts = states(ft_dir / "checkpoints")
    head_only, final = at_epoch(ckpts, 1)["model"], at_epoch(ckpts, 10)["model"]
    assert differing(head_only, pretrained, backbone) == [], "the frozen backbone moved during the head-only phase"
    assert head_only["head.weight"].shape == (5, 64)
    assert differing(final, pretrained, backbone) == backbone, "unfreezing did not train every backbone tensor"

    ok(run_cli("train", FINETUNE, "model.init_from=", "finetune.head=null", "finetune.phases=[]",
               f"out_dir={scratch_dir}", env=ONE_THREAD))
    transfer, scratch = final_val_acc(ft_dir), final_val_acc(scratch_dir)
    print(f"\ndigits 5-9, 45 training images, 10 epochs: val_acc fine-tuned {transfer:.4f}, from scratch {scratch:.4f}")
    assert transfer > scratch + 0.01, (transfer, scratch)


# ---------------------------------------------------------------- 2. DDP across a phase change

PHASED = {
    "data": {"args": {"classes": [0, 1, 2, 3, 4]}, "batch_size": 16},
    "finetune": {"head": {"module": "head", "num_classes": 5},
                 "phases": [{"epochs": 1, "train": ["head"]}, {"train": ["all"]}]},
    "checkpoint": {"keep_last": 0},
}


@pytest.mark.slow
def test_two_ranks_stay_identical_after_unfreezing(tmp_path):
    job = write_job(tmp_path, **PHASED)
    dump = tmp_path / "weights"
    out = ok(run_torchrun("train", job, env={"RUNNER_TEST_DUMP_WEIGHTS": dump}))
    assert "phase 2/2: training all" in out
    rank0, rank1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    params = [name for name, _ in SmallCNN(num_classes=5, width=8).named_parameters()]
    assert differing(rank0, rank1, params) == [], "ranks diverged: DDP does not synchronize these parameters"
    # (BatchNorm running statistics may differ: DDP broadcasts rank 0's at the start of each forward, and the
    # last forward then updates each rank's copy from its own batch; checkpoints hold rank 0's.)
    ckpts = states(tmp_path / "job" / "checkpoints")
    after_head_only = at_epoch(ckpts, 1)["model"]
    assert_tensors_equal(at_epoch(ckpts, 2)["model"], rank0)
    backbone = [k for k in rank0 if not k.startswith("head.")]
    assert differing(rank0, after_head_only, backbone) == backbone  # the unfrozen backbone did train


# ---------------------------------------------------------------- 3. kill mid-phase → resume → bit-exact

LR = 0.01
RESUMABLE = {
    "data": {"args": {"classes": [0, 1, 2, 3, 4]}},  # 721 training images: 23 steps per epoch
    "optim": {"name": "AdamW", "lr": LR},
    "scheduler": {"name": "CosineAnnealingLR", "args": {"T_max": 69}, "interval": "step"},
    "train": {"max_epochs": 3},
    "finetune": {"head": {"module": "head", "num_classes": 5},
                 "phases": [{"epochs": 1, "train": ["head"], "lr_mult": {"head": 10}},
                            {"train": ["all"], "lr_mult": {"backbone": 0.1, "features.7": 0.5}}]},
    "checkpoint": {"every_steps": 10, "keep_last": 0},
}


def groups(state: dict) -> dict[str, tuple[float, float]]:
    return {g["name"]: (g["lr_mult"], g["lr"]) for g in state["optimizer"]["param_groups"]}


def test_killed_mid_phase_resumes_bit_exact_with_per_group_lrs(tmp_path, monkeypatch, capsys, one_thread):
    straight = write_job(tmp_path, "straight", **RESUMABLE)
    assert cli.main(["train", str(straight)]) == 0
    killed = write_job(tmp_path, "killed", **RESUMABLE)
    # a fault in the head-only phase (resumes at step 10), then one mid-epoch in the unfrozen phase (at 30)
    for fail_at, resume_at in ((15, None), (37, 10), (None, 30)):
        capsys.readouterr()
        with monkeypatch.context() as env:
            if fail_at is None:
                assert cli.main(["train", str(killed)]) == 0
            else:
                env.setenv("RUNNER_TEST_FAIL_AT_STEP", str(fail_at))
                with pytest.raises(RuntimeError, match=f"injected test fault at step {fail_at}"):
                    cli.main(["train", str(killed)])
        if resume_at:
            resumed = f"resuming from {tmp_path / 'killed' / 'checkpoints'}/step-{resume_at:09d}"
            assert resumed in capsys.readouterr().out

    a, b = states(tmp_path / "straight" / "checkpoints"), states(tmp_path / "killed" / "checkpoints")
    assert sorted(a) == sorted(b) == [10, 20, 23, 30, 40, 46, 50, 60, 69]
    for step in a:  # model, optimizer (state, lr, lr_mult, initial_lr per group), scheduler, RNG, progress
        assert_tensors_equal(a[step][0], b[step][0], f"step {step}")
    # the groups carry the phase's multipliers on top of the cosine schedule
    mults_1 = {"features.7": 1.0, "head": 10.0, "rest": 1.0}  # phase 1: head x10
    mults_2 = {"features.7": 0.5, "head": 1.0, "rest": 0.1}   # phase 2: backbone x0.1, its last conv x0.5
    for step, mults in ((10, mults_1), (30, mults_2), (60, mults_2)):
        cosine = (1 + torch.cos(torch.tensor(torch.pi * step / 69, dtype=torch.float64)).item()) / 2
        got = groups(b[step][0])
        assert {name: m for name, (m, _) in got.items()} == mults, step
        assert {name: lr for name, (_, lr) in got.items()} == pytest.approx(
            {name: LR * m * cosine for name, m in mults.items()}, rel=1e-6), step


# ---------------------------------------------------------------- 4. torchvision resnet18 from a state_dict file

def test_resnet18_from_a_state_dict_file_new_head_and_phase_change(tmp_path, capsys, one_thread):
    import torchvision

    torch.manual_seed(123)
    pretrained = torchvision.models.resnet18().state_dict()  # 1000 classes, as an ImageNet file would have
    weights = tmp_path / "resnet18.pth"
    torch.save(pretrained, weights)
    job = write_job(
        tmp_path, "resnet", base={},
        model={"name": "torchvision.resnet18", "init_from": str(weights)},
        data={"name": "synthetic", "args": {"shape": [3, 32, 32], "num_classes": 4, "size": 64, "val_size": 16},
              "batch_size": 16},
        optim={"name": "SGD", "lr": 0.01, "args": {"momentum": 0.9}},
        train={"max_epochs": 2, "progress": "plain"},
        finetune={"head": {"module": "fc", "num_classes": 4},
                  "phases": [{"epochs": 1, "train": ["head"]},
                             {"train": ["layer4", "head"], "lr_mult": {"layer4": 0.1}}]},
        checkpoint={"keep_last": 0})
    assert cli.main(["train", str(job)]) == 0
    out = capsys.readouterr().out
    assert f"loaded 120/120 tensors from {weights}; missing: none; unexpected: none; new head: fc" in out
    assert "phase 2/2: training layer4, head" in out
    ckpts = states(tmp_path / "resnet" / "checkpoints")
    head_only, final = at_epoch(ckpts, 1)["model"], at_epoch(ckpts, 2)["model"]
    assert final["fc.weight"].shape == (4, 512)
    body = [k for k in pretrained if not k.startswith("fc.")]
    assert differing(head_only, pretrained, body) == []
    layer4 = [k for k in body if k.startswith("layer4.")]
    assert differing(final, pretrained, body) == layer4  # BatchNorm of frozen layers kept its statistics


# ---------------------------------------------------------------- 5. refusals: one line, exit 2

def _small_cnn() -> SmallCNN:
    return SmallCNN(num_classes=10, width=8, dropout=0.2)  # what TINY_JOB builds


def _missing_key_file(folder: Path) -> str:
    state = _small_cnn().state_dict()
    del state["features.0.weight"]
    torch.save(state, folder / "partial.pt")
    return str(folder / "partial.pt")


def _whole_model_file(folder: Path) -> str:
    torch.save(_small_cnn(), folder / "whole.pt")  # what many tutorials do
    return str(folder / "whole.pt")


HEAD = {"module": "head", "num_classes": 10}


@pytest.mark.parametrize("make, finetune, message", [
    (_missing_key_file, {"head": HEAD}, "does not match the model: missing features.0.weight; unexpected none"),
    (_whole_model_file, {"head": HEAD},
     "contains a pickled Python object (runner.models.SmallCNN), e.g. a whole model saved with torch.save(model)"),
    (None, {"head": {"module": "classifier", "num_classes": 10}},
     "finetune.head.module: model has no module 'classifier'; top-level modules: features, dropout, head"),
    (None, {"head": HEAD, "phases": [{"epochs": 1, "train": ["head"]}, {"train": ["features", "blocks"]}]},
     "finetune.phases[1].train: model has no module 'blocks'; top-level modules: features, dropout, head"),
    (None, {"head": HEAD, "phases": [{"train": ["all"], "lr_mult": {"feature": 0.1}}]},
     "finetune.phases[0].lr_mult: model has no module 'feature'; top-level modules: features, dropout, head"),
], ids=["strict-missing-key", "whole-model-pickle", "no-such-head", "no-such-phase-module", "no-such-lr-module"])
def test_refusals_are_one_line(tmp_path, capsys, make, finetune, message):
    model = {"init_from": make(tmp_path)} if make else {}
    job = write_job(tmp_path, model=model, finetune=finetune)
    assert cli.main(["train", str(job)]) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "job" / "checkpoints").exists()


def test_whole_model_pickle_loads_with_trust_pickle(tmp_path, capsys, one_thread):
    job = write_job(tmp_path, model={"init_from": _whole_model_file(tmp_path), "trust_pickle": True},
                    train={"max_steps": 1}, finetune={"head": HEAD})
    assert cli.main(["train", str(job)]) == 0
    assert "loaded 21/21 tensors" in capsys.readouterr().out


def test_torchvision_weights_download_failure_is_one_line(tmp_path):
    # A proxy on a closed local port: the download fails at once, online or not, and nothing is fetched.
    proxy = "http://127.0.0.1:9"
    job = write_job(tmp_path, base={}, model={"name": "torchvision.resnet18", "weights": "IMAGENET1K_V1"},
                    data={"name": "synthetic", "args": {"shape": [3, 32, 32], "size": 8, "val_size": 4}},
                    finetune={"head": {"module": "fc", "num_classes": 10}})
    proc = run_cli("train", job, timeout=120,
                   env={"TORCH_HOME": tmp_path / "torch-home", "HTTPS_PROXY": proxy, "https_proxy": proxy,
                        "HTTP_PROXY": proxy, "http_proxy": proxy, "NO_PROXY": "", "no_proxy": ""})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("runner: error")]
    assert errors == [proc.stderr.strip().splitlines()[-1]]
    assert "model.weights: downloading IMAGENET1K_V1 weights for torchvision.resnet18 failed" in errors[0]
    assert "model.init_from" in errors[0]


# ---------------------------------------------------------------- 6. summary of the example's plan

def test_summary_of_the_finetune_example_shows_each_phase(capsys):
    assert cli.main(["summary", str(FINETUNE)]) == 0  # builds the model only: no pretrain checkpoint needed
    out = capsys.readouterr().out
    total = sum(p.numel() for p in SmallCNN(num_classes=5).parameters())
    head = 64 * 5 + 5
    assert "fine-tune plan (head: head):" in out
    assert f"phase 1 (epoch 0): trains head — trainable {head:,} / frozen {total - head:,}; lr head x10" in out
    assert f"phase 2 (epochs 1-end): trains all — trainable {total:,} / frozen 0" in out
