"""The checkpoint directory's lease: one writer per lineage, stale writers fenced out, on every storage backend."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import fsspec
import pytest

from runner.store import lease as lease_mod
from runner.errors import CheckpointError
from runner.store.lease import LEASE, Lease, LeaseHeld


@pytest.fixture(autouse=True)
def fast(monkeypatch):
    monkeypatch.setattr(lease_mod, "SETTLE_S", 0.02)
    monkeypatch.setattr(lease_mod, "POLL_S", 0.05)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def where(store_url):
    """(fs, root path, url) of an empty checkpoint directory."""
    url, options = store_url
    fs, root = fsspec.core.url_to_fs(url, **options)
    return fs, root, url


def lease(where, owner: str, ttl_s: float = 60.0) -> Lease:
    fs, root, url = where
    return Lease(fs, root, url, ttl_s=ttl_s, owner=owner)


def record(where) -> dict | None:
    fs, root, _ = where
    fs.invalidate_cache()
    try:
        return json.loads(fs.cat_file(f"{root}/{LEASE}"))
    except FileNotFoundError:
        return None


def plant(where, blob: bytes) -> None:
    """A lease file as another run (or a damaged store) left it."""
    fs, root, _ = where
    if "file" in fs.protocol:
        os.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/{LEASE}", blob)


def plant_record(where, pid: int, host: str | None = None, ttl_s: float = 60.0) -> None:
    plant(where, json.dumps({"owner": "other", "host": host or socket.gethostname(), "pid": pid,
                             "heartbeat": time.time(), "ttl_s": ttl_s}).encode())


def exited_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_acquire_on_an_empty_store_writes_our_record(where):
    mine = lease(where, "mine", ttl_s=30)
    mine.acquire(wait_s=0)
    held = record(where)
    assert {k: held[k] for k in ("owner", "host", "pid", "ttl_s")} == {
        "owner": "mine", "host": socket.gethostname(), "pid": os.getpid(), "ttl_s": 30}
    assert abs(held["heartbeat"] - time.time()) < 5
    assert mine.still_ours()
    mine.acquire(wait_s=0)  # a holder acquiring again does not wait for itself


def test_live_lease_makes_a_starter_wait_then_fail(where):
    holder = lease(where, "holder")
    holder.acquire(wait_s=0)
    start = time.monotonic()
    with pytest.raises(LeaseHeld) as err:
        lease(where, "starter").acquire(wait_s=0.3)
    assert time.monotonic() - start >= 0.3
    msg = str(err.value)
    assert msg.startswith(f"{where[2]} is being written by another run (host {socket.gethostname()}, "
                          f"pid {os.getpid()}, heartbeat ")
    assert msg.endswith("; stop it, or wait until its lease expires (ttl 60s)") and "\n" not in msg
    assert isinstance(err.value, CheckpointError) and err.value.exit_status == 2
    assert holder.still_ours() and record(where)["owner"] == "holder"


def test_starter_takes_over_once_the_lease_expires(where):
    lease(where, "paused", ttl_s=0.4).acquire(wait_s=0)
    start = time.monotonic()
    lease(where, "starter").acquire(wait_s=1.5)
    assert 0.3 < time.monotonic() - start < 1.5
    assert record(where)["owner"] == "starter"


def test_takeover_fences_out_the_old_holder(where):
    old = lease(where, "old", ttl_s=0.2)
    old.acquire(wait_s=0)
    time.sleep(0.3)  # the old holder was paused past its TTL
    new = lease(where, "new")
    new.acquire(wait_s=0)
    assert not old.still_ours() and not old.renew()
    assert new.still_ours() and record(where)["owner"] == "new"  # the refused renewal wrote nothing
    old.start_heartbeat(every_s=0.02)
    deadline = time.monotonic() + 1
    while not old.lost and time.monotonic() < deadline:
        time.sleep(0.02)
    assert old.lost and new.still_ours()
    old.release()  # not ours any more: left in place
    assert record(where)["owner"] == "new"


def test_heartbeat_keeps_the_lease_and_release_frees_it(where):
    holder = lease(where, "holder", ttl_s=0.5)
    holder.acquire(wait_s=0)
    holder.start_heartbeat()
    time.sleep(0.7)  # longer than the TTL: only the heartbeat keeps it live
    with pytest.raises(LeaseHeld):
        lease(where, "starter").acquire(wait_s=0)
    assert not holder.lost
    holder.release()
    assert record(where) is None
    lease(where, "starter").acquire(wait_s=0)


def test_release_deletes_only_our_own_lease(where):
    holder = lease(where, "holder")
    holder.acquire(wait_s=0)
    lease(where, "bystander").release()
    assert record(where)["owner"] == "holder" and holder.still_ours()


def test_lease_of_an_exited_process_on_this_host_is_taken_at_once(where):
    plant_record(where, exited_pid())  # e.g. the run before a torchrun restart, killed with SIGKILL
    lease(where, "rerun").acquire(wait_s=0)
    assert record(where)["owner"] == "rerun"


def test_lease_of_a_pid_on_another_host_is_not_judged_by_this_hosts_processes(where):
    plant_record(where, exited_pid(), host=f"not-{socket.gethostname()}")
    with pytest.raises(LeaseHeld, match=f"host not-{socket.gethostname()}"):
        lease(where, "starter").acquire(wait_s=0)


def test_lease_of_a_live_process_on_this_host_is_not_taken_over(where):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        plant_record(where, proc.pid)
        with pytest.raises(LeaseHeld, match=f"pid {proc.pid}"):
            lease(where, "starter").acquire(wait_s=0.2)
        assert record(where)["owner"] == "other"
    finally:
        proc.kill()
        proc.wait()
    lease(where, "starter").acquire(wait_s=0)  # once it is gone, at once


@pytest.mark.parametrize("blob", [b"", b'{"owner": "x", "hea', b"[1, 2]",
                                  b'{"owner": "x", "host": "h", "pid": "12", "heartbeat": 1, "ttl_s": 60}'])
def test_garbled_lease_is_free(where, blob):
    plant(where, blob)
    lease(where, "starter").acquire(wait_s=0)
    assert record(where)["owner"] == "starter"


def test_racing_starters_end_with_one_holder(where, monkeypatch):
    """Both find the store free and both write: the read-back decides, as no object store can compare-and-swap."""
    monkeypatch.setattr(lease_mod, "SETTLE_S", 0.3)  # longer than a write, so both writes land before either reads
    both_read = threading.Barrier(2, timeout=5)
    write = Lease._write

    def write_once_both_have_read(self: Lease) -> None:
        both_read.wait()
        write(self)

    monkeypatch.setattr(Lease, "_write", write_once_both_have_read)
    outcome = {}

    def start(one: Lease) -> None:
        try:
            one.acquire(wait_s=0.1)
            outcome[one.owner] = "acquired"
        except LeaseHeld:
            outcome[one.owner] = "refused"

    threads = [threading.Thread(target=start, args=(lease(where, f"starter-{i}"),)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcome.values()) == ["acquired", "refused"]
    winner = next(owner for owner, result in outcome.items() if result == "acquired")
    assert record(where)["owner"] == winner


def test_storage_errors_do_not_end_the_heartbeat(tmp_path):
    fs, root = fsspec.core.url_to_fs(str(tmp_path / "ckpt"))
    holder = Lease(fs, root, str(tmp_path / "ckpt"), ttl_s=0.3, owner="holder")
    holder.acquire(wait_s=0)
    path = tmp_path / "ckpt" / LEASE
    path.unlink()
    path.mkdir()  # every read and write of the lease now fails
    assert holder.renew()  # a transient failure is not a takeover
    holder.start_heartbeat(every_s=0.02)
    time.sleep(0.1)
    with pytest.raises(CheckpointError, match=f"cannot read the lease of {tmp_path / 'ckpt'}: IsADirectoryError"):
        holder.still_ours()
    path.rmdir()  # storage recovers: the next beat writes our record again
    time.sleep(0.1)
    assert holder.still_ours() and not holder.lost
    holder.release()
