"""Resuming on another number of processes (real torchrun, gloo): the exact data position, the same global batch,
and torchrun's elastic membership (a node lost, then back).

The data order is the sampler's (runner/data.py, ShardedSampler): order = f(seed, epoch); a rank's share is dealt
from the epoch's global position, so a checkpoint's position is valid for any world size.
"""
from __future__ import annotations

import json
import re
import signal
import socket
from pathlib import Path

import pytest
import torch

from fault_helpers import text, wait_until
from helpers import (consumed, epoch_order, free_port, job_folder, kill_everything, launched, newest_state, ok,
                     run_cli, run_torchrun, torchrun_cmd, write_job)

pytestmark = pytest.mark.slow

SIZE = 384  # training samples
RECORDING = {
    "model": {"name": "mlp", "args": {"hidden": [32], "dropout": 0.0}},
    "data": {"name": "recording_data:build", "args": {"size": SIZE, "val_size": 64}, "batch_size": 16,
             "global_batch_size": 96, "num_workers": 0},
    "optim": {"name": "AdamW", "lr": 0.01},
    "train": {"max_epochs": 3, "seed": 0, "progress": "plain"},
    "checkpoint": {"keep_last": 0},
    "dist": {"timeout_s": 60},
}
STEPS_PER_EPOCH = SIZE // 96


def test_two_ranks_then_one_then_three_consume_every_sample_once_in_order(tmp_path):
    """2 ranks stopped mid-epoch 1, resumed on 1 process and stopped mid-epoch 2, resumed on 3 ranks to the end:
    every epoch's consumed indices are the epoch's order, each index once, across the launches."""
    job = write_job(job_folder(tmp_path), "job", base=RECORDING)
    records = [tmp_path / f"rec{i}" for i in range(3)]
    for r in records:
        r.mkdir()
    # rank 1 gets the signal after step 1; the ranks agree on it one step later
    first = run_torchrun("train", job, nproc=2, env={"RECORD_DIR": records[0], "RUNNER_TEST_SIGNAL_AT_STEP": "1:1"})
    assert "preempted: step 2 committed" in first.stdout, first.stdout[-3000:] + first.stderr[-3000:]
    second = run_cli("train", job, env={"RECORD_DIR": records[1], "OMP_NUM_THREADS": 1,
                                        "RUNNER_TEST_SIGNAL_AT_STEP": str(STEPS_PER_EPOCH + 2)})
    assert second.returncode == 75, second.stdout[-3000:] + second.stderr[-3000:]
    assert "world size 2 → 1" in second.stdout and "sample 192 of the epoch (written by 2 process(es))" in second.stdout
    assert "global batch 96 (16 per rank × 6 accumulated)" in second.stdout
    third = ok(run_torchrun("train", job, nproc=3, env={"RECORD_DIR": records[2]}))
    assert "world size 1 → 3" in third and f"step {STEPS_PER_EPOCH + 2}, epoch 2, sample 192 of the epoch" in third
    assert f"done: {3 * STEPS_PER_EPOCH} steps, 3 epochs" in third

    launches = [consumed(records[0], 2), consumed(records[1], 1), consumed(records[2], 3)]
    half = SIZE // 2
    epochs = [launches[0] + launches[1][:half], launches[1][half:] + launches[2][:half], launches[2][half:]]
    assert [len(e) for e in epochs] == [SIZE, SIZE, SIZE]  # 384 is a multiple of 96: no padding anywhere
    for epoch, indices in enumerate(epochs):
        assert indices == epoch_order(SIZE, epoch), f"epoch {epoch + 1} is not the uninterrupted order"
        assert sorted(indices) == list(range(SIZE))


# --- the same optimization on another world size ----------------------------------------------------------

CURVES = {
    "model": {"name": "mlp", "args": {"hidden": [64], "dropout": 0.0}},  # no dropout: no per-rank randomness
    "data": {"name": "synthetic", "args": {"size": 512, "val_size": 128}, "batch_size": 16,
             "global_batch_size": 64},
    "optim": {"name": "AdamW", "lr": 0.01},
    "scheduler": {"name": "StepLR", "args": {"step_size": 5, "gamma": 0.7}, "interval": "step"},
    "train": {"max_epochs": 3, "seed": 0, "progress": "plain"},
    "checkpoint": {"keep_last": 0},
    "dist": {"timeout_s": 60},
}


def history(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight")
    ok(run_torchrun("train", write_job(folder, "job", base=CURVES), nproc=2))
    return folder / "job"


@pytest.mark.parametrize("resume_on", [1, 4])
def test_a_fixed_global_batch_gives_the_same_curves_on_another_world_size(straight, tmp_path, resume_on):
    job = write_job(tmp_path, "job", base=CURVES)
    first = run_torchrun("train", job, nproc=2, env={"RUNNER_TEST_SIGNAL_AT_STEP": "10"})  # stops at 11, mid-epoch 2
    assert "preempted: step 11 committed" in first.stdout, first.stdout[-3000:] + first.stderr[-3000:]
    if resume_on == 1:
        out = ok(run_cli("train", job, env={"OMP_NUM_THREADS": 1}))
    else:
        out = ok(run_torchrun("train", job, nproc=resume_on))
    assert f"world size 2 → {resume_on}" in out and "step 11, epoch 2, sample 192 of the epoch" in out
    want, got = history(straight), history(tmp_path / "job")
    assert [m["step"] for m in got] == [m["step"] for m in want] == [8, 16, 24]
    worst = 0.0
    for a, b in zip(want, got):
        for key in ("train_loss", "val_loss", "lr"):
            worst = max(worst, abs(a[key] - b[key]) / abs(a[key]))
            assert b[key] == pytest.approx(a[key], rel=1e-6), (key, a, b)
    print(f"2 → {resume_on} processes: largest relative difference of train_loss/val_loss/lr: {worst:.2e}")
    a, _ = newest_state(straight / "checkpoints")
    b, _ = newest_state(tmp_path / "job" / "checkpoints")
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=1e-5, atol=1e-6)


def test_unreachable_global_batch_and_too_many_processes_are_refused(tmp_path):
    job = write_job(tmp_path, "job", base=CURVES, data={"global_batch_size": 48})  # 16 × 4 ranks = 64 ∤ 48
    out = run_torchrun("train", job, nproc=4)
    assert out.returncode != 0
    line = next(line for line in out.stderr.splitlines() if "runner: error" in line)
    assert "data.global_batch_size 48" in line and "16 × 4 process(es) = 64" in line and "1, 3" in line
    small = write_job(tmp_path, "small", base=CURVES, data={"args": {"size": 2}, "global_batch_size": None})
    out = run_torchrun("train", small, nproc=3)
    assert out.returncode != 0 and "2 sample(s), fewer than the 3 processes" in out.stderr


def test_per_rank_batch_only_needs_an_allowance_and_says_the_global_batch_changes(tmp_path):
    job = write_job(tmp_path, "job", base=CURVES, data={"global_batch_size": None})
    first = run_torchrun("train", job, nproc=2, env={"RUNNER_TEST_SIGNAL_AT_STEP": "4"})  # agreed at step 5
    assert "preempted: step 5 committed" in first.stdout, first.stdout[-3000:] + first.stderr[-3000:]
    refused = run_cli("train", job, env={"OMP_NUM_THREADS": 1})
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert "data.global_batch_size 32 → 16" in lines[0] and "data.global_batch_size=32 keeps" in lines[0]
    out = ok(run_cli("train", job, "resume.allow_world_size_change=true", env={"OMP_NUM_THREADS": 1}))
    assert "the global batch changes from 32 to 16" in out and "sample 160 of the epoch" in out


# --- torchrun elastic membership ---------------------------------------------------------------------------

ELASTIC = {**CURVES, "train": {**CURVES["train"], "max_epochs": 40},
           "checkpoint": {"keep_last": 3, "every_steps": 4}, "dist": {"timeout_s": 15}}


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_elastic_node_lost_then_back(tmp_path):
    """Two agents (--nnodes=1:2) on loopback; the agent not hosting the rendezvous store is SIGKILLed with its
    worker mid-epoch; the survivor restarts alone (world size 1) from the newest checkpoint at the exact
    position; a new second agent joins at a later restart; the job finishes with the uninterrupted step count."""
    job = write_job(tmp_path, "job", base=ELASTIC)
    port = free_port()
    elastic = ("--nnodes=1:2", "--max-restarts=5", f"--rdzv-id=elastic-{port}",
               "--rdzv-conf=join_timeout=120,last_call_timeout=2,close_timeout=10")
    # Slowed commits (every 4 steps) stretch the run, so the second node comes back while it still trains.
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": 1, "RUNNER_TEST_SLOW_COMMIT_S": 0.3}
    logs = [tmp_path / f"agent{i}.txt" for i in range(3)]
    with launched(torchrun_cmd("train", job, nproc=1, port=port, max_restarts=5, extra=elastic), logs[0],
                  **env) as host:
        wait_until(lambda: listening(port), "the first agent hosting the rendezvous store", host, logs[0])
        with launched(torchrun_cmd("train", job, nproc=1, port=port, max_restarts=5, extra=elastic), logs[1],
                      **env) as other:
            wait_until(lambda: re.search(r"checkpoint step (\d+) committed", text(logs[0])) and
                       "world size 2" in text(logs[0]), "a checkpoint with 2 nodes", host, logs[0])
            kill_everything(other, first=signal.SIGKILL)  # the agent and its worker, at once
        wait_until(lambda: "world size 2 → 1" in text(logs[0]), "the survivor resuming alone", host, logs[0])
        with launched(torchrun_cmd("train", job, nproc=1, port=port, max_restarts=5, extra=elastic), logs[2],
                      **env) as back:
            wait_until(lambda: "world size 1 → 2" in text(logs[0]) + text(logs[2]), "the node back", host, logs[0])
            assert host.wait(600) == 0 and back.wait(120) == 0, text(logs[0])[-4000:]
    out = text(logs[0]) + text(logs[2])
    for line in out.splitlines():  # what torchrun and runner did, for the record (pytest -s)
        if re.search(r"world size|resuming from|preempted|done:|restart|new nodes|waiting|FAILED", line):
            print(line[:200])
    resumes = re.findall(r"resuming from \S+: step (\d+), epoch \d+, sample (\d+) of the epoch \(written by "
                         r"(\d) process\(es\)\); (\d+) step", out)
    assert [w for _, _, w, _ in resumes[:2]] == ["2", "1"]  # lost a node, then got it back
    assert resumes[1][3] == "0"  # the membership change stopped the workers with a committed step: none lost
    assert f"done: {40 * 8} steps, 40 epochs" in out
