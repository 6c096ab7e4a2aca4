"""Leftovers and wrong numbers after interrupted or refused launches (README, "Checkpoints and resume": the commit
rule, "One writer" and `runner ckpt`): a killed writer's S3 multipart upload, a stop while waiting for another
run's lease, `ckpt verify` of an empty store, `ckpt inspect`'s epoch."""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from helpers import launched, runner_cmd, write_job
from runner import cli
from runner.store import lease as lease_mod
from runner.store import CheckpointStore
from runner.store.lease import LEASE, Lease, StoppedWaiting
from runner.report import build_report, load_events

MiB = 1 << 20
# The writer of a 10 MiB state.pt, SIGKILLed after its first two 5 MiB parts are uploaded.
KILLED_WRITER = """
import os, signal, sys
from runner.store import CheckpointStore
store = CheckpointStore(sys.argv[1], {"endpoint_url": sys.argv[2], "skip_instance_cache": True,
                                      "default_block_size": 5 << 20})
def payload(out):
    for _ in range(11):
        out.write(b"x" * (1 << 20))
    os.kill(os.getpid(), signal.SIGKILL)
store.commit(8, {"state.pt": payload}, {})
"""


def main(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def uploads(fs, bucket: str, prefix: str) -> list[str]:
    return [u["Key"] for u in fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix).get("Uploads", [])]


def test_start_up_cleanup_aborts_the_multipart_upload_of_a_killed_writer(s3_store_url, capsys):
    url, options = s3_store_url
    store = CheckpointStore(url, options)
    bucket = url.removeprefix("s3://").split("/")[0]
    child = subprocess.run([sys.executable, "-c", KILLED_WRITER, url, options["endpoint_url"]], timeout=120)
    assert child.returncode == -signal.SIGKILL
    other = store.fs.call_s3("create_multipart_upload", Bucket=bucket, Key="ckpt-other/step-000000001/state.pt")
    (left,) = uploads(store.fs, bucket, "ckpt/")  # what a SIGKILL leaves: S3 keeps its parts until aborted
    code, out, _ = main(capsys, "ckpt", "ls", url, "-o", f"endpoint_url={options['endpoint_url']}")
    assert code == 0 and out.startswith(f"no checkpoints under {url}\n")
    assert re.search(r"1 incomplete upload\(s\), 10\.0 MiB, .*step-000000008/state\.\w+\.pt \(2 part\(s\), "
                     r"10\.0 MiB\)", out), out
    removed = store.cleanup_partial()
    assert removed == [f"s3://{bucket}/{left}"] and re.fullmatch(r"ckpt/step-000000008/state\.\w+\.pt", left)
    assert uploads(store.fs, bucket, "ckpt/") == [] and store.incomplete_uploads() == []
    assert uploads(store.fs, bucket, "ckpt-other/") == [other["Key"]]  # another directory's: not ours to abort
    code, out, _ = main(capsys, "ckpt", "ls", url, "-o", f"endpoint_url={options['endpoint_url']}")
    assert out.strip() == f"no checkpoints under {url}"


def test_the_next_run_removes_a_killed_writers_upload_at_start(s3_store_url, tmp_path, capsys, one_thread,
                                                               monkeypatch):
    url, options = s3_store_url
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket = url.removeprefix("s3://").split("/")[0]
    subprocess.run([sys.executable, "-c", KILLED_WRITER, url, options["endpoint_url"]], timeout=120)
    job = write_job(tmp_path, "job", data={"name": "synthetic", "args": {"size": 128, "val_size": 32},
                                           "batch_size": 64},
                    train={"max_epochs": 1}, checkpoint={"dir": url, "storage_options": options})
    (left,) = uploads(CheckpointStore(url, options).fs, bucket, "ckpt/")
    code, _, err = main(capsys, "train", job)
    assert code == 0 and f"removed incomplete checkpoint write s3://{bucket}/{left}" in err
    assert uploads(CheckpointStore(url, options).fs, bucket, "ckpt/") == []


def test_cleanup_leaves_the_upload_this_store_is_writing(s3_store_url):
    url, options = s3_store_url
    store = CheckpointStore(url, {**options, "default_block_size": 5 * MiB})
    seen = []

    def payload(out):
        out.write(b"y" * (6 * MiB))  # one part uploaded, the upload in progress
        seen.append((store.incomplete_uploads(), store.cleanup_partial()))
        out.write(b"y" * MiB)

    store.commit(3, {"state.pt": payload}, {})
    assert seen == [([], [])]
    assert store.verify(store.list()[0]).valid


@pytest.fixture
def held(tmp_path, monkeypatch):
    """A checkpoint dir whose lease a live process of this host (the test) holds for a minute."""
    monkeypatch.setattr(lease_mod, "POLL_S", 0.05)
    store = tmp_path / "job" / "checkpoints"
    store.mkdir(parents=True)
    (store / LEASE).write_text(json.dumps({"owner": "other", "host": socket.gethostname(), "pid": 1,
                                           "heartbeat": time.time(), "ttl_s": 60}))
    return store


def test_a_stop_ends_the_wait_for_the_lease_at_once(held):
    import fsspec

    asked = time.monotonic() + 0.3
    lease = Lease(fsspec.filesystem("file"), str(held), str(held), ttl_s=60)
    with pytest.raises(StoppedWaiting) as e:
        lease.acquire(should_stop=lambda: "SIGTERM" if time.monotonic() > asked else None)
    assert time.monotonic() - asked < 1 and e.value.exit_status == 143
    assert str(e.value) == (f"stopped by SIGTERM while waiting for the lease on {held}, held by another run (host "
                            f"{socket.gethostname()}, pid 1, heartbeat 0s ago); nothing was trained")
    assert json.loads((held / LEASE).read_text())["owner"] == "other"


def test_sigterm_while_waiting_for_the_lease_exits_143_and_the_report_lists_a_refused_launch(tmp_path, held):
    job = write_job(tmp_path, "job", preemption={"grace_s": 20})
    log = tmp_path / "train.log"
    with launched(runner_cmd("train", job), log) as proc:
        deadline = time.monotonic() + 120
        while "waiting up to" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert proc.wait(30) == 143, log.read_text()
        assert time.monotonic() - t0 < 10  # not the watchdog's grace_s + 2 s later
    text = log.read_text()
    assert "runner: error: stopped by SIGTERM while waiting for the lease on" in text and "nothing was trained" in text
    assert "stuck" not in text and not list(held.glob("step-*"))
    report = build_report(load_events(tmp_path / "job"))
    assert report.launches == [] and [r.status for r in report.refused] == [143]


def commit_position(store: CheckpointStore, step: int, epoch: int, sample: int) -> None:
    import io

    buf = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(2)}}, buf)
    store.commit(step, {"state.pt": buf.getvalue()},
                 {"epoch": epoch, "sample_in_epoch": sample, "world_size": 1, "finished": sample == 0})


def test_ls_and_inspect_number_epochs_as_the_log_does(tmp_path, capsys):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    commit_position(store, 80, 3, 128)  # in the 4th epoch ("epoch 4 …" when it ends)
    commit_position(store, 92, 4, 0)  # a finished 4-epoch run: manifest epoch 4 is the (0-based) next one
    _, out, _ = main(capsys, "ckpt", "inspect", store.url + "/step-000000092")
    assert out.splitlines()[0] == "position: step 92, end of epoch 4, written by 1 process(es)"
    _, out, _ = main(capsys, "ckpt", "inspect", store.url + "/step-000000080")
    assert out.splitlines()[0] == "position: step 80, epoch 4, global sample 128 of the epoch, written by 1 process(es)"
    _, out, _ = main(capsys, "ckpt", "ls", store.url)
    assert [line.split()[:2] for line in out.splitlines()[1:]] == [["80", "4"], ["92", "4"]]


def test_verify_of_an_empty_or_new_directory_finds_nothing_invalid(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for where in (tmp_path / "empty", tmp_path / "new"):
        code, out, _ = main(capsys, "ckpt", "verify", where)
        assert (code, out.strip()) == (0, f"no checkpoints under {where}: nothing to verify")
