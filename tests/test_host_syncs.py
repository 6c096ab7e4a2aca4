"""No host sync per step: between log intervals runner's own code reads no tensor from the device and makes no
blocking collective (torch's own, such as DDP's gradient all-reduce, do not count). Counted by the test-only
hook RUNNER_TEST_COUNT_SYNCS (runner/test_hooks.py) in real runs: one process, and 2 ranks under torchrun."""
from __future__ import annotations

import json

import pytest

from helpers import ok, run_cli, run_torchrun, write_job

JOB = {
    "model": {"name": "mlp", "args": {"hidden": [32]}},
    "data": {"name": "synthetic", "args": {"size": 512, "val_size": 64}, "batch_size": 16},
    "optim": {"name": "AdamW", "lr": 0.01},
    "train": {"max_epochs": 2, "seed": 0, "progress": "plain", "log_every_steps": 10, "accumulate": 2},
    "checkpoint": {"every_steps": 7},
}
AGREEMENT = "preemption.py:_finish tolist"  # the flags of the previous step, a CPU tensor from a gloo all-reduce
# train.step with metrics as a tensor and as a float, next to the job file
USER_STEP = """
import torch.nn.functional as F


def step(model, batch):
    x, y = batch
    out = model(x)
    return F.cross_entropy(out, y), {"acc": (out.argmax(1) == y).float().mean(), "half": 0.5}
"""


def counts(path, rank: int) -> dict[int, dict[str, int]]:
    return {int(step): c for step, c in json.loads((path.parent / f"{path.name}.rank{rank}.json").read_text()).items()}


@pytest.mark.parametrize("nproc, user_step", [(1, None), (1, "user_step:step"),
                                               pytest.param(2, None, marks=pytest.mark.slow)])
def test_no_host_reads_or_blocking_collectives_between_log_steps(tmp_path, nproc, user_step):
    (tmp_path / "user_step.py").write_text(USER_STEP)
    job = write_job(tmp_path, "job", base=JOB, train={"step": user_step})
    path = tmp_path / "syncs"
    env = {"RUNNER_TEST_COUNT_SYNCS": path, "OMP_NUM_THREADS": 1}
    ok(run_torchrun("train", job, nproc=nproc, env=env) if nproc > 1 else run_cli("train", job, env=env))
    steps_per_epoch = 512 // (16 * nproc * 2)
    quiet = [s for s in range(1, 2 * steps_per_epoch + 1)
             if s % 10 and s % 7 and s % steps_per_epoch]  # not a log, save or epoch-end step
    assert len(quiet) >= 8
    for rank in range(nproc):
        found = counts(path, rank)
        for step in quiet:
            own = {what: n for what, n in found.get(step, {}).items() if what != AGREEMENT}
            assert own == {}, f"rank {rank}, step {step}: {own}"
        assert any("running_loss" in what or "dist.py" in what for what in found.get(10, {})), found.get(10)
        if nproc > 1:  # the agreement is read once per step, on the CPU, from an all-reduce started a step before
            assert found[quiet[-1]] == {AGREEMENT: 1}
    if user_step:  # its metrics were accumulated and recorded
        last = json.loads((tmp_path / "job" / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["train_half"] == last["val_half"] == 0.5 and 0 < last["train_acc"] <= 1
