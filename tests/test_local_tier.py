"""The node-local tier (README, "A node-local copy"; docs/design.md, "The node-local tier"): checkpoints committed
to checkpoint.local_dir first and every 3rd copied to checkpoint.dir; a crash resumes from the newer local copy,
bit-identical to an uninterrupted run (1 process, and a torchrun restart after a worker crash); a corrupt local
copy falls back with one warning; a new machine (no local copy) resumes from the durable store, or, in a multi-node
job, from rank 0's copy sent over the process group; local copies never outlive their run, and another lineage's are
never resumed."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from fault_helpers import JOB, assert_same_final_state, finish, reference, resumed
from helpers import free_port, launched, merge, ok, run_cli, run_torchrun, write_job
from runner.store import LocalTier

pytestmark = pytest.mark.slow


def tiered(tmp_path: Path, name: str = "job") -> tuple[Path, LocalTier]:
    sections = {"checkpoint": {"every_steps": 5, "keep_last": 0, "local_dir": str(tmp_path / "shm"),
                               "durable_every": 3}}
    job = write_job(tmp_path, name, base=merge(JOB, sections))
    return job, LocalTier(str(tmp_path / "shm"), str(tmp_path / name / "checkpoints"))


def step_dirs(folder: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("step-*"))


@pytest.mark.parametrize("then, resumes_at", [("as it is", 55), ("corrupt", 50), ("new machine", 45)])
def test_a_crash_resumes_from_the_newest_copy_it_can_trust(tmp_path_factory, tmp_path, then, resumes_at):
    ref = reference(tmp_path_factory, 1)
    job, local = tiered(tmp_path)
    crashed = run_cli("train", job, env={"RUNNER_TEST_FAIL_AT_STEP": 57, "OMP_NUM_THREADS": 1})
    assert crashed.returncode == 1, crashed.stderr[-3000:]
    # every 5 steps and at the epoch's end (45): 5..55 on this machine, every 3rd save durable
    assert step_dirs(local.root) == [50, 55] and step_dirs(tmp_path / "job" / "checkpoints") == [15, 30, 45]
    if then == "corrupt":
        state = local.root / f"step-{55:09d}" / "state.pt"
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 1
        state.write_bytes(bytes(data))
    elif then == "new machine":
        shutil.rmtree(tmp_path / "shm")
    out = ok(run_cli("train", job, env={"OMP_NUM_THREADS": 1}))
    (url, step, _), = resumed(out)
    expected = local.root if then != "new machine" else tmp_path / "job" / "checkpoints"
    assert (url, step) == (f"{expected}/step-{resumes_at:09d}", resumes_at), out[-3000:]
    warnings = [line for line in out.splitlines() if "WARNING" in line]
    if then == "corrupt":
        assert len(warnings) == 1 and "state.pt: sha256 mismatch" in warnings[0] and "step-000000055" in warnings[0]
    else:
        assert not warnings, warnings
    assert_same_final_state(tmp_path / "job" / "checkpoints", ref)
    assert not local.root.exists()  # the run is finished: its local copies are gone


def test_a_torchrun_restart_after_a_worker_crash_resumes_from_the_local_copy(tmp_path_factory, tmp_path):
    ref = reference(tmp_path_factory, 2)
    job, local = tiered(tmp_path)
    out = ok(run_torchrun("train", job, max_restarts=1, env={
        "RUNNER_TEST_FAIL_AT_STEP": "22:1", "RUNNER_TEST_FAULT_ONCE": tmp_path / "fired",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": 1}))
    (url, step, lost), = resumed(out)
    # saves at 5, 10, 15 (durable), 20: the newest is on this machine only
    assert (url, step, lost) == (f"{local.root}/step-{20:09d}", 20, 2), out[-3000:]
    assert_same_final_state(tmp_path / "job" / "checkpoints", ref)


def test_another_lineages_local_copies_are_removed_not_resumed(tmp_path):
    job, local = tiered(tmp_path)
    crashed = run_cli("train", job, env={"RUNNER_TEST_FAIL_AT_STEP": 12, "OMP_NUM_THREADS": 1})
    assert crashed.returncode == 1 and step_dirs(local.root) == [5, 10]  # no durable copy yet
    out = ok(run_cli("train", job, "train.max_epochs=1", env={"OMP_NUM_THREADS": 1}))
    assert "fresh start" in out and "resuming" not in out, out[-3000:]  # the durable store had nothing to trust
    assert not local.root.exists()


def two_nodes(tmp_path: Path, job: Path, launch: str, envs: tuple[dict, dict] = ({}, {})) -> list[tuple[int, str]]:
    """Two torchrun agents on this machine as nodes 0 and 1 of one job (static rendezvous, so node 0 holds rank 0),
    each with its own checkpoint.local_dir as two machines have; `envs`: each node's. Both (exit status, output)."""
    port, logs = free_port(), [tmp_path / f"{launch}-node{node}.txt" for node in (0, 1)]
    cmds = [[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1",
             "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "runner", "train", job,
             f"checkpoint.local_dir={tmp_path / f'shm{node}'}"] for node in (0, 1)]
    with launched(cmds[0], logs[0], **envs[0]) as a, launched(cmds[1], logs[1], **envs[1]) as b:
        outs = [finish(a, logs[0]), finish(b, logs[1])]
    return [(a.returncode, outs[0]), (b.returncode, outs[1])]


def test_a_new_node_restores_from_rank_0s_local_copy_sent_over_the_process_group(tmp_path_factory, tmp_path):
    ref = reference(tmp_path_factory, 2)
    job, _ = tiered(tmp_path)
    local = LocalTier(str(tmp_path / "shm0"), str(tmp_path / "job" / "checkpoints"))  # node 0's copies
    crash = two_nodes(tmp_path, job, "crash", ({"RUNNER_TEST_FAIL_AT_STEP": "22:0"},
                                               {"RUNNER_TEST_FAIL_AT_STEP": "22:1"}))
    # saves at 5, 10, 15 (durable), 20: the newest is on node 0 only
    assert [status for status, _ in crash] == [1, 1], crash[0][1][-3000:]
    assert step_dirs(local.root) == [15, 20] and step_dirs(tmp_path / "job" / "checkpoints") == [15]
    shutil.rmtree(tmp_path / "shm1", ignore_errors=True)  # node 1 is a new VM: nothing local
    (status0, out), (status1, out1) = two_nodes(tmp_path, job, "resume")
    assert (status0, status1) == (0, 0), (out + out1)[-4000:]
    (url, step, lost), = resumed(out)
    assert (url, step, lost) == (f"{local.root}/step-{20:09d}", 20, 2), out[-3000:]  # not the durable 15
    assert f"rank(s) 1 had no copy of {url} on their machine: restored from rank 0's" in out, out[-3000:]
    events = [json.loads(line) for line in (tmp_path / "job" / "events.jsonl").read_text().splitlines() if line]
    assert [(e["checkpoint"], e["peer_ranks"]) for e in events if e["event"] == "resume"] == [(url, [1])]
    assert "[runner] WARNING" not in out + out1, (out + out1)[-4000:]
    assert_same_final_state(tmp_path / "job" / "checkpoints", ref)
    assert not local.root.exists()
