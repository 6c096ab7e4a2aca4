"""A cloud preemption notice stops a real run like SIGTERM (README, "Preemption and fault tolerance"): all ranks
stop at the same step, the step reached is committed, exit 75 — and under torchrun --max-restarts the launch ends
instead of restarting into a VM about to go. Fake metadata servers on 127.0.0.1 only (tests/fake_metadata.py);
nothing leaves this machine."""
from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone

import pytest

from fake_metadata import AwsHandler, AzureHandler, GcpHandler, serve
from fault_helpers import text, wait_until
from helpers import (assert_tensors_equal, free_port, launched, newest_state, ok, run_torchrun, runner_cmd,
                     torchrun_cmd, write_job)

pytestmark = pytest.mark.slow

JOB = {
    "model": {"name": "mlp", "args": {"hidden": [32]}},
    "data": {"name": "synthetic", "args": {"size": 512, "val_size": 64}, "batch_size": 16, "num_workers": 1},
    "optim": {"name": "AdamW", "lr": 0.01},
    "train": {"max_epochs": 3, "seed": 0, "progress": "plain"},
    "checkpoint": {"every_steps": 5},
    "preemption": {"notice_poll_s": 0.2},
    "dist": {"timeout_s": 60},
}


@pytest.fixture
def aws():
    server = serve(AwsHandler)
    yield server
    server.shutdown()


def notice_in(server, seconds: float) -> None:
    server.notice_time = datetime.now(timezone.utc) + timedelta(seconds=seconds)
    server.turn_on()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 2-rank run."""
    folder = tmp_path_factory.mktemp("reference")
    ok(run_torchrun("train", write_job(folder, "ref", base=JOB), nproc=2))
    return folder / "ref" / "checkpoints"


@pytest.mark.parametrize("provider, handler", [("aws", AwsHandler), ("gcp", GcpHandler), ("azure", AzureHandler)])
def test_a_notice_stops_every_rank_once_under_max_restarts_and_resumes_bit_exact(tmp_path, reference, provider,
                                                                                 handler):
    server = serve(handler)
    try:
        job = write_job(tmp_path, "job", base=JOB, preemption={"notice": provider})
        log = tmp_path / "first.txt"
        cmd = torchrun_cmd("train", job, nproc=2, max_restarts=3)
        with launched(cmd, log, RUNNER_METADATA_URL=server.url, RUNNER_TEST_SLOW_COMMIT_S=0.3) as agent:
            wait_until(lambda: "checkpoint step 5 committed" in text(log), "a first checkpoint", agent, log)
            notice_in(server, 120)  # AWS's two-minute warning (GCP's window is 30 s)
            assert agent.wait(120) != 0  # torchrun reports the workers' 75 as a failure, and does not restart
    finally:
        server.shutdown()
    out = text(log)
    committed = re.findall(r"preempted: step (\d+) committed", out)
    assert len(committed) == 1, out[-3000:]
    assert out.count("fresh start") == 1 and "resuming from" not in out  # the launch ended: no restart
    assert f"watching {provider} preemption notices" in out and f"{provider} preemption notice" in out
    second = ok(run_torchrun("train", job, "preemption.notice=off", nproc=2))
    assert f"step {committed[0]}" in second and "0 step(s) lost" in second
    got, _ = newest_state(tmp_path / "job" / "checkpoints")
    want, _ = newest_state(reference)
    for section in ("model", "optimizer"):
        assert_tensors_equal(got[section], want[section], section)


@pytest.mark.parametrize("seconds, slow_commit, status", [(10, 0.5, 75), (2, 3, 3)])
def test_the_notice_deadline_is_the_deadline_and_a_save_that_cannot_fit_is_reported(tmp_path, aws, seconds,
                                                                                    slow_commit, status):
    """AWS gives a time: 10 s out the emergency checkpoint is committed before it; 2 s out, with saves taking
    3 s, the notice says at once that the save may not fit, and the run ends with status 3."""
    job = write_job(tmp_path, "job", base=JOB, preemption={"notice": "aws"})
    log = tmp_path / "run.txt"
    with launched(runner_cmd("train", job), log, RUNNER_METADATA_URL=aws.url,
                  RUNNER_TEST_SLOW_COMMIT_S=slow_commit) as proc:
        wait_until(lambda: "checkpoint step 5 committed" in text(log), "a first checkpoint", proc, log)
        notice_in(aws, seconds)
        deadline = aws.notice_time.timestamp()
        assert proc.wait(120) == status, text(log)[-3000:]
    out = text(log)
    late = "more than the" in out and "left before the deadline" in out
    assert late == (status == 3), out[-3000:]
    events = [json.loads(line) for line in (tmp_path / "job" / "events.jsonl").read_text().splitlines()]
    [notice] = [e for e in events if e["event"] == "notice"]
    assert notice["provider"] == "aws" and notice["deadline"] == pytest.approx(deadline, abs=1)
    if status == 75:
        [emergency] = [e for e in events if e["event"] == "checkpoint" and e["emergency"]]
        assert emergency["committed"] and emergency["time"] < deadline


def test_azure_notice_is_acknowledged_only_after_the_commit(tmp_path):
    azure = serve(AzureHandler)
    try:
        job = write_job(tmp_path, "job", base=JOB, preemption={"notice": "azure"})
        log = tmp_path / "run.txt"
        with launched(runner_cmd("train", job), log, RUNNER_METADATA_URL=azure.url,
                      RUNNER_TEST_SLOW_COMMIT_S=1) as proc:
            wait_until(lambda: "checkpoint step 5 committed" in text(log), "a first checkpoint", proc, log)
            notice_in(azure, 60)
            wait_until(lambda: "saving step" in text(log), "the emergency save starting", proc, log)
            assert azure.acknowledged == []  # not while the emergency checkpoint is being written
            assert proc.wait(120) == 75, text(log)[-3000:]
        out = text(log)
        step = re.findall(r"preempted: step (\d+) committed", out)
        assert step and azure.acknowledged == [{"StartRequests": [{"EventId": AzureHandler.EVENT["EventId"]}]}]
        _, manifest = newest_state(tmp_path / "job" / "checkpoints")
        assert manifest["step"] == int(step[0])
    finally:
        azure.shutdown()


def test_a_notice_on_one_node_stops_both_nodes_at_the_same_step_without_restarts(tmp_path, aws):
    """Two torchrun agents (--nnodes=2, --max-restarts=3) on loopback; only the second node's metadata service
    gives the notice (RUNNER_METADATA_URL is per node). Both nodes stop at the same step, it is committed, and
    neither agent restarts its worker."""
    import socket

    job = write_job(tmp_path, "job", base=JOB, preemption={"notice": "aws"})
    port = free_port()
    extra = ("--nnodes=2", f"--rdzv-id=notice-{port}")
    logs = [tmp_path / "node0.txt", tmp_path / "node1.txt"]
    # node 0 watches a metadata URL nobody answers (refused at once): no notice there
    with launched(torchrun_cmd("train", job, nproc=1, port=port, max_restarts=3, extra=extra), logs[0],
                  RUNNER_METADATA_URL=f"http://127.0.0.1:{free_port()}", RUNNER_TEST_SLOW_COMMIT_S=0.3) as node0:
        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0
        wait_until(listening, "node 0 hosting the rendezvous store", node0, logs[0])
        with launched(torchrun_cmd("train", job, nproc=1, port=port, max_restarts=3, extra=extra), logs[1],
                      RUNNER_METADATA_URL=aws.url, RUNNER_TEST_SLOW_COMMIT_S=0.3) as node1:
            wait_until(lambda: "checkpoint step 5 committed" in text(logs[0]), "a first checkpoint", node0, logs[0])
            notice_in(aws, 120)
            assert node0.wait(120) != 0 and node1.wait(120) != 0
    out0, out1 = text(logs[0]), text(logs[1])
    committed = re.findall(r"preempted: step (\d+) committed", out0)
    assert len(committed) == 1 and "aws" in out1 and "terminate" in out1, out0[-2000:] + out1[-2000:]
    assert out0.count("fresh start") == 1 and "resuming from" not in out0  # no restart on either node
    _, manifest = newest_state(tmp_path / "job" / "checkpoints")
    assert manifest["step"] == int(committed[0]) and manifest["world_size"] == 2
