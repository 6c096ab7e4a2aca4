"""Distributed training under torchrun (README, "Distributed"; docs/design.md, "Distributed rules"): every test
launches real `torchrun` subprocesses, CPU + gloo.

One 2-rank reference run (module fixture `ref`) is shared: rank-identical weights, the log, equivalence with a
1-process run at twice the batch, exact sharded evaluation, multi-node and determinism all compare against it.
Every rank's final weights come back through the test-only hook RUNNER_TEST_DUMP_WEIGHTS (runner/test_hooks.py),
since only rank 0 writes checkpoints.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as tdist
import torch.nn.functional as F

from helpers import (assert_tensors_equal, free_port, launched, newest_state, ok, run_cli, run_torchrun, torchrun_cmd,
                     write_job)

TIMEOUT = 240  # per launch; a run takes ~15 s, most of it importing torch three times on 2 shared cores
B = 16  # per-rank batch of the 2-rank runs; the 1-process run uses 2 * B
VAL_FRACTION = 0.1987  # digits (1,797 samples) → 357 val (odd: 179 + 178 over 2 ranks), 1,440 train = 45 × 2B
EPOCHS = 2

# No BatchNorm, no dropout: under DDP BatchNorm statistics are per rank (each rank normalizes its own b
# samples) and dropout masks are drawn per rank, so such a model legitimately differs from 1 process × 2b.
JOB = {
    "model": {"name": "mlp", "args": {"hidden": [16], "dropout": 0.0}},
    "data": {"name": "digits", "args": {"val_fraction": VAL_FRACTION}, "batch_size": B, "eval_batch_size": 50},
    "optim": {"name": "SGD", "lr": 0.05, "args": {"momentum": 0.9}},
    "train": {"max_epochs": EPOCHS, "seed": 0, "progress": "plain"},
    "dist": {"timeout_s": 60},
}
RUNNER_SCRIPT = Path(sys.executable).parent / "runner"  # the console script of this venv


# --- launching ---------------------------------------------------------------------------------------------------

def tee_by_rank(log_dir: Path) -> tuple:
    """torchrun options that prefix every console line with the global rank that printed it."""
    return ("--log-dir", str(log_dir), "--tee", "3", "--log-line-prefix-template", "[rank${rank}]: ")


# --- reading results back --------------------------------------------------------------------------------------

def weights(dump: Path, rank: int) -> dict:
    return torch.load(dump / f"rank{rank}.pt", map_location="cpu", weights_only=True)


def history(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The reference: 2 ranks × batch B under `torchrun -m runner`, console lines tagged with their rank."""
    tmp = tmp_path_factory.mktemp("ref")
    job = write_job(tmp, "ddp", base=JOB)
    t0 = time.monotonic()
    proc = run_torchrun("train", job, extra=tee_by_rank(tmp / "logs"), env={"RUNNER_TEST_DUMP_WEIGHTS": tmp / "dump"},
                        timeout=TIMEOUT)
    return SimpleNamespace(tmp=tmp, job=job, out_dir=tmp / "ddp", dump=tmp / "dump", output=ok(proc),
                           seconds=time.monotonic() - t0)


# --- tests -----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ranks_end_bit_identical_and_match_the_checkpoint(ref):
    rank0, rank1 = weights(ref.dump, 0), weights(ref.dump, 1)
    assert rank0.keys() == rank1.keys() and rank0
    assert_tensors_equal(rank0, rank1, "rank0 vs rank1")
    state, manifest = newest_state(ref.out_dir / "checkpoints")
    assert manifest["world_size"] == 2 and manifest["epoch"] == EPOCHS
    assert_tensors_equal(state["model"], rank0, "checkpoint vs rank0")
    # Training moved the weights (a run that silently skipped steps would also be "identical").
    assert manifest["step"] == EPOCHS * 1440 // (2 * B)


@pytest.mark.slow
def test_log_states_global_batch_and_only_rank0_prints_epochs(ref):
    assert "world size 2" in ref.output
    assert f"global batch {2 * B} ({B} per rank)" in ref.output
    epoch_lines = re.findall(r"^\[rank(\d+)\]: \[runner\] epoch (\d+) step", ref.output, re.M)
    assert epoch_lines == [("0", str(e + 1)) for e in range(EPOCHS)], ref.output[-3000:]
    # Other ranks speak only for warnings and errors.
    chatter = [l for l in ref.output.splitlines() if l.startswith("[rank1]: [runner]") and "WARNING" not in l]
    assert not chatter, chatter


@pytest.mark.slow
def test_two_ranks_match_one_process_with_twice_the_batch(ref, tmp_path):
    from runner.data import ShardedSampler, digits

    data = digits(val_fraction=VAL_FRACTION)
    n = len(data.train)
    assert n % (2 * B) == 0, "padding would add repeated samples to the 2-rank run only"
    # Same data order: global batch i of the 2-rank run (rank 0's and rank 1's batch i) is the set of
    # samples in batch i of the 1-process run, because the sampler shards one (seed, epoch) order as order[r::2].
    for epoch in range(EPOCHS):
        shards = []
        for rank, world in ((0, 2), (1, 2), (0, 1)):
            s = ShardedSampler(n, rank, world, JOB["train"]["seed"], shuffle=True, pad=True)
            s.set_epoch(epoch)
            shards.append(list(s))
        r0, r1, single = shards
        assert len(r0) == len(r1) == n // 2 and sorted(single) == list(range(n))
        for i in range(n // (2 * B)):
            two = r0[i * B:(i + 1) * B] + r1[i * B:(i + 1) * B]
            assert len(set(two)) == 2 * B and set(two) == set(single[i * 2 * B:(i + 1) * 2 * B])

    job = write_job(tmp_path, "single", base=JOB, data={"batch_size": 2 * B})
    out = ok(run_cli("train", job, env={"OMP_NUM_THREADS": 1}, timeout=TIMEOUT))
    assert f"global batch {2 * B} ({2 * B} per rank)" in out
    two, one = history(ref.out_dir), history(tmp_path / "single")
    assert [m["step"] for m in two] == [m["step"] for m in one]
    # Tolerance 1e-6 relative. DDP averages per-rank mean gradients (mean over b, all-reduced, halved) where one
    # process takes a single mean over 2b: the same float32 numbers summed in another order, ~1e-7 relative
    # (a few ulp) per step. 90 SGD steps with momentum carry that forward without blowing it up on this small
    # well-conditioned MLP: measured ~3e-8 relative on these curves, so 1e-6 is 30x margin, yet far below a
    # real mismatch (a wrong shard, a padded sample, or a gradient summed instead of averaged moves the losses
    # by percents).
    for a, b in zip(two, one):
        for key in ("train_loss", "val_loss"):
            assert math.isclose(a[key], b[key], rel_tol=1e-6), (key, a, b)
        for key in ("train_acc", "val_acc"):  # counts out of 1,440 / 357; one flipped argmax at most
            assert abs(a[key] - b[key]) <= 1.5 / (1440 if key == "train_acc" else 357), (key, a, b)


@pytest.mark.slow
def test_sharded_eval_equals_single_process_eval_of_the_checkpoint(ref):
    """Val set of 357 (179 + 178 per rank, partial batches of 50): nothing padded, nothing counted twice."""
    from runner.components import build_model
    from runner.config import load_config
    from runner.data import build_datasets

    cfg = load_config(ref.job)
    data = build_datasets(cfg.data)
    assert len(data.val) == 357 and len(data.val) % 2 == 1
    state, manifest = newest_state(ref.out_dir / "checkpoints")
    model = build_model(cfg.model, data.num_classes, data.input_shape)
    model.load_state_dict(state["model"])
    model.eval()
    x, y = data.val.tensors
    with torch.no_grad():
        out = model(x)  # the whole set in one batch, one process, no runner code in the loop
    val_acc = (out.argmax(1) == y).sum().item() / len(y)
    val_loss = F.cross_entropy(out, y, reduction="none").double().sum().item() / len(y)
    logged = history(ref.out_dir)[-1]  # evaluated by 2 ranks on exactly these weights (saved right after)
    assert logged == manifest["metrics"] and logged["epoch"] == EPOCHS
    assert logged["val_acc"] == val_acc  # exact: the same correct count over the same 357 samples
    # Per-sample losses are summed in float64, so batching and rank split add no rounding of their own; what
    # remains is float32 logits of one sample computed inside a batch of 50 vs 357 (GEMM blocking), a few ulp:
    # ≤ ~1e-6 relative (measured here: bit-equal). A double-counted or dropped sample moves the mean by ~1/357.
    assert math.isclose(logged["val_loss"], val_loss, rel_tol=1e-6), (logged["val_loss"], val_loss)


@pytest.mark.slow
def test_a_rank_that_raises_fails_the_job_in_time_naming_the_rank(tmp_path):
    timeout_s = 20
    job = write_job(tmp_path, "fail", base=JOB, dist={"timeout_s": timeout_s})
    log = tmp_path / "out.txt"
    # Step 3 of 45 (mid-epoch) raises on rank 1.
    with launched(torchrun_cmd("train", job), log, RUNNER_TEST_FAIL_AT_STEP="3:1") as proc:
        start, raised = time.monotonic(), None
        while proc.poll() is None:
            if raised is None and "injected test fault" in log.read_text(errors="replace"):
                raised = time.monotonic()
            assert time.monotonic() - start < TIMEOUT, "the job hangs after a rank raised"
            time.sleep(0.2)
        ended = time.monotonic()
    out = log.read_text(errors="replace")
    assert proc.returncode != 0, out[-3000:]
    assert "RuntimeError: injected test fault at step 3 on rank 1" in out, out[-3000:]
    # torchrun's failure summary names the rank that failed first.
    assert re.search(r"Root Cause.*?rank\s*:\s*1 \(local_rank: 1\)", out, re.S), out[-3000:]
    assert ended - (raised or ended) < timeout_s + 15, f"exit {ended - raised:.1f}s after the fault"
    assert not (tmp_path / "fail" / "metrics.jsonl").exists()  # it failed inside epoch 1


@pytest.mark.slow
def test_multi_node_on_loopback_matches_one_agent(ref, tmp_path):
    """Two torchrun agents (`--nnodes=2 --nproc-per-node=1`) meet through c10d rendezvous on 127.0.0.1.

    Which agent becomes rank 0 is decided by the rendezvous (join order), so no --node-rank is given. It does
    not matter for the result: everything a process does is a function of its global rank (its shard, its
    per-rank seed), not of its node, and the all-reduce of two gradients is a commutative sum, so either
    assignment gives bit-identical weights to the one-agent run's.
    """
    port = free_port()
    job = write_job(tmp_path, "nodes", base=JOB)
    dump = {"RUNNER_TEST_DUMP_WEIGHTS": tmp_path / "dump"}
    cmd = torchrun_cmd("train", job, nproc=1, port=port, extra=("--nnodes=2", f"--rdzv-id=test-{port}"))
    logs = [tmp_path / "agent0.txt", tmp_path / "agent1.txt"]
    with launched(cmd, logs[0], **dump) as a, launched(cmd, logs[1], **dump) as b:
        for proc in (a, b):
            proc.wait(TIMEOUT)
    outs = [log.read_text(errors="replace") for log in logs]
    for proc, out in zip((a, b), outs):
        assert proc.returncode == 0, out[-3000:]
    assert sum("world size 2" in out for out in outs) == 1  # one rank 0, on one of the two agents
    for rank in (0, 1):
        assert_tensors_equal(weights(tmp_path / "dump", rank), weights(ref.dump, 0), f"rank {rank}")
    state, _ = newest_state(tmp_path / "nodes" / "checkpoints")
    ref_state, _ = newest_state(ref.out_dir / "checkpoints")
    assert_tensors_equal(state["model"], ref_state["model"], "model")
    assert_tensors_equal(state["optimizer"], ref_state["optimizer"], "optimizer")
    assert history(tmp_path / "nodes") == history(ref.out_dir)


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["no-python", "console-script"])
def test_same_job_twice_is_bit_identical_and_console_script_works(ref, tmp_path, entry):
    """Determinism, launching the `runner` console command the two ways torchrun allows.

    `torchrun --no-python runner train …` (runner found on PATH) and `torchrun $(which runner) train …`.
    """
    assert RUNNER_SCRIPT.exists(), "the runner console script is not installed in this venv"
    job = write_job(tmp_path, "again", base=JOB)
    entry_args = ("--no-python", "runner") if entry == "no-python" else (RUNNER_SCRIPT,)
    path = f"{RUNNER_SCRIPT.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    out = ok(run_torchrun("train", job, entry=entry_args, env={"RUNNER_TEST_DUMP_WEIGHTS": tmp_path / "dump",
                                                                "PATH": path}, timeout=TIMEOUT))
    assert f"global batch {2 * B}" in out
    for rank in (0, 1):
        assert_tensors_equal(weights(tmp_path / "dump", rank), weights(ref.dump, rank), f"rank {rank}")
    state, _ = newest_state(tmp_path / "again" / "checkpoints")
    ref_state, _ = newest_state(ref.out_dir / "checkpoints")
    for section in ("model", "optimizer", "ranks"):
        assert_tensors_equal(state[section], ref_state[section], section)
    assert history(tmp_path / "again") == history(ref.out_dir)


def test_without_torchrun_no_process_group_is_initialized(tmp_path, monkeypatch):
    """In-process: no torchrun environment → world size 1, plain module, torch.distributed never initialized."""
    import runner.loop as loop
    from runner.config import load_config

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    seen = {}
    real_run = loop.run

    def spy(job, *args):
        seen.update(initialized=tdist.is_initialized(), world=job.env.world_size, distributed=job.env.distributed)
        result = real_run(job, *args)
        seen["wrapped"] = type(job.wrapped).__name__
        return result

    monkeypatch.setattr(loop, "run", spy)
    job = write_job(tmp_path, "plain", base=JOB, train={"max_steps": 3})
    assert loop.train(load_config(job)) == 0
    assert seen == {"initialized": False, "world": 1, "distributed": False, "wrapped": "MLP"}
    assert not tdist.is_initialized()
