"""One storage suite that every backend (local dir, memory://, S3 server) must pass."""

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import socket
import stat
import sys
import threading
import time
import urllib.request
from unittest.mock import ANY

import fsspec
import pytest
import s3fs
from botocore.exceptions import (ClientError, ConnectionClosedError, ConnectTimeoutError, PartialCredentialsError,
                                 ReadTimeoutError)
from s3fs.errors import translate_boto_error

from runner.store import directory as checkpoint
from runner.store import faults as storage_faults
from runner.store.directory import SLOW_COMMIT_ENV, CheckpointInfo, CheckpointStore, open_checkpoint
from runner.store.faults import retry_transient
from runner.errors import CheckpointError, CorruptCheckpoint, StorageError, StorageUnavailable
from runner.store.manifest import MANIFEST
from runner.store.faults import storage_fault
from runner.store_cli import describe_listing, run_verify


def _store(store_url):
    url, options = store_url
    return CheckpointStore(url, options)


def _raw(store_url):
    """The backend itself, to inspect and damage checkpoints behind the store's back."""
    url, options = store_url
    return fsspec.core.url_to_fs(url, **options)


def _children(store_url) -> set[str]:
    fs, root = _raw(store_url)
    fs.invalidate_cache()
    try:
        return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    except FileNotFoundError:
        return set()


def _put(fs, path, data):
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # local needs the directory; object stores ignore it
    fs.pipe_file(path, data)


def _commit(store, step, loss=None, payload=None):
    meta = {"epoch": step // 2, "metrics": {} if loss is None else {"loss": loss}}
    return store.commit(step, {"state.pt": payload or f"state {step}".encode() * 10, "extra.bin": b"x" * step}, meta)


def test_commit_list_read_round_trip(store_url):
    store = _store(store_url)
    urls = [_commit(store, s) for s in (12, 3)]
    infos = store.list()
    assert [(i.step, i.valid, i.reason) for i in infos] == [(3, True, ""), (12, True, "")]
    assert [i.url for i in infos] == urls[::-1]
    assert urls[0].endswith("/step-000000012")
    assert store.read(urls[0]) == b"state 12" * 10
    assert store.read(infos[0], "extra.bin") == b"xxx"
    assert store.verify(urls[0]).valid
    # A fresh store object (another process, in effect) sees the same thing.
    assert [i.step for i in _store(store_url).list()] == [3, 12]


def test_manifest_contents(store_url):
    store = _store(store_url)
    before = time.time()
    url = store.commit(7, {"state.pt": b"abc"}, {"epoch": 1, "world_size": 2, "metrics": {"loss": 0.5}})
    fs, root = _raw(store_url)
    manifest = json.loads(fs.cat_file(f"{root}/step-000000007/{MANIFEST}"))
    entry = {"size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}
    if store.local:  # renamed into place: stored under its own name
        assert manifest["files"] == {"state.pt": entry}
    else:  # object stores: a fresh object per commit, so a rewrite of step 7 never touches this one
        assert manifest["files"] == {"state.pt": {**entry, "object": ANY}}
        assert re.fullmatch(r"state\.[0-9a-f]{12}\.pt", manifest["files"]["state.pt"]["object"])
    assert _files(fs, f"{root}/step-000000007") == {MANIFEST, manifest["files"]["state.pt"].get("object", "state.pt")}
    assert manifest["step"] == 7 and manifest["epoch"] == 1 and manifest["world_size"] == 2
    assert manifest["metrics"] == {"loss": 0.5}
    assert before <= manifest["committed_at"] <= time.time()
    assert store.list()[0].manifest == manifest == store.verify(url).manifest


def test_missing_store_dir_lists_nothing(store_url):
    store = _store(store_url)
    assert store.list() == []
    assert store.latest_valid() is None
    assert store.prune(keep_last=1) == [] and store.cleanup_partial() == []


def _manifest(fs, d) -> dict:
    fs.invalidate_cache()
    return json.loads(fs.cat_file(f"{d}/{MANIFEST}"))


def _stored(fs, d, name="state.pt") -> str:
    """Where `name` of checkpoint directory `d` is stored (object stores: a fresh object name per commit)."""
    return f"{d}/{_manifest(fs, d)['files'][name].get('object', name)}"


def _files(fs, d) -> set[str]:
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[-1] for p in fs.find(d)}


def _truncate(fs, d):
    fs.pipe_file(_stored(fs, d), fs.cat_file(_stored(fs, d))[:-5])


def _flip(fs, d):
    data = bytearray(fs.cat_file(_stored(fs, d)))
    data[3] ^= 0xFF
    fs.pipe_file(_stored(fs, d), bytes(data))


def _drop_manifest(fs, d):
    fs.rm_file(f"{d}/{MANIFEST}")


def _drop_file(fs, d):
    fs.rm_file(_stored(fs, d, "extra.bin"))


@pytest.mark.parametrize("damage, reason", [
    (_truncate, "state.pt: size 75 != 80"),
    (_flip, "state.pt: sha256 mismatch"),
    (_drop_manifest, "manifest missing"),
    (_drop_file, "extra.bin: missing"),
])
def test_latest_valid_skips_damaged_newest(store_url, damage, reason):
    store = _store(store_url)
    _commit(store, 1, payload=b"a" * 80)
    bad_url = _commit(store, 2, payload=b"b" * 80)
    fs, root = _raw(store_url)
    damage(fs, f"{root}/step-000000002")
    warnings = []
    latest = store.latest_valid(warn=warnings.append)
    assert latest.step == 1 and latest.valid
    assert len(warnings) == 1 and bad_url in warnings[0] and reason in warnings[0]
    checked = store.verify(bad_url)
    assert (checked.valid, checked.reason) == (False, reason)
    with pytest.raises(CheckpointError, match="step-000000002"):
        store.read(bad_url, "extra.bin" if damage is _drop_file else "state.pt")
    text, code = run_verify(store_url[0], store_url[1])
    assert code == 1 and f"INVALID: {reason}" in text


def test_prune_keeps_last_and_best(store_url):
    store = _store(store_url)
    losses = {1: 0.5, 2: 0.1, 3: 0.4, 4: 0.3, 5: 0.35}
    urls = {s: _commit(store, s, loss) for s, loss in losses.items()}
    deleted = store.prune(keep_last=2, keep_best=1, metric="loss", mode="min")
    assert sorted(deleted) == sorted([urls[1], urls[3]])
    assert _children(store_url) == {"step-000000002", "step-000000004", "step-000000005"}
    assert store.prune(keep_last=1, keep_best=1, metric="loss", mode="max") == [urls[2], urls[4]]
    assert _children(store_url) == {"step-000000005"}
    assert store.prune(keep_last=0) == []


def test_prune_never_deletes_newest_valid(store_url):
    store = _store(store_url)
    for s in (1, 2, 3):
        _commit(store, s, loss=float(s))
    fs, root = _raw(store_url)
    _truncate(fs, f"{root}/step-000000003")  # newest is broken: step 2 is the newest valid
    assert store.prune(keep_last=1, keep_best=1, metric="loss") == []
    # keep_best picked step 1, keep_last step 2; step 3 is newer than the newest valid one: left alone.
    assert _children(store_url) == {"step-000000001", "step-000000002", "step-000000003"}
    store.prune(keep_last=1)
    assert _children(store_url) == {"step-000000002", "step-000000003"}
    assert store.latest_valid(warn=lambda m: None).step == 2


def test_commit_replaces_same_step(store_url):
    store = _store(store_url)
    _commit(store, 4, payload=b"old")
    url = _commit(store, 4, payload=b"new, longer")
    assert store.read(url) == b"new, longer"
    assert [i.step for i in store.list()] == [4]
    assert _children(store_url) == {"step-000000004"}


def test_cleanup_partial_removes_interrupted_writes(store_url):
    store = _store(store_url)
    _commit(store, 1)
    fs, root = _raw(store_url)
    # What a kill leaves behind: a local temp dir, and a step dir whose manifest never arrived.
    _put(fs, f"{root}/.tmp-step-000000002-deadbeef/state.pt", b"half")
    _put(fs, f"{root}/step-000000003/state.pt", b"half")
    _put(fs, f"{root}/notes.txt", b"not ours")
    infos = store.list()
    assert [(i.step, i.valid, i.reason) for i in infos] == [(1, True, ""), (3, False, "manifest missing")]
    assert store.latest_valid(warn=lambda m: None).step == 1
    removed = store.cleanup_partial()
    assert sorted(r.rsplit("/", 1)[-1] for r in removed) == [".tmp-step-000000002-deadbeef", "step-000000003"]
    assert _children(store_url) == {"step-000000001", "notes.txt"}
    assert store.cleanup_partial() == []


def test_slow_commit_hook_leaves_no_valid_checkpoint_mid_write(store_url, monkeypatch):
    store, observer = _store(store_url), _store(store_url)
    monkeypatch.setenv(SLOW_COMMIT_ENV, "3.0")  # room for the observer's listing on a loaded 2-core machine
    thread = threading.Thread(target=_commit, args=(store, 9))
    start = time.monotonic()
    thread.start()
    while not _children(store_url) and thread.is_alive():  # wait for the data to land
        time.sleep(0.02)
    seen = observer.list()
    assert thread.is_alive(), "commit finished before the test could look inside it"
    assert not any(i.valid for i in seen)  # data written, manifest not yet: nothing valid
    thread.join()
    assert time.monotonic() - start >= 3.0
    assert [(i.step, i.valid) for i in store.list()] == [(9, True)]
    assert not any(n.startswith(".tmp-") for n in _children(store_url))


def test_run_verify_and_listing(store_url):
    url, options = store_url
    store = _store(store_url)
    text, code = run_verify(url, options)
    assert code == 0 and "no checkpoints" in text  # nothing invalid
    ck1, ck2 = _commit(store, 1, loss=0.25), _commit(store, 2, payload=b"z" * 50)
    text, code = run_verify(url, options)
    assert code == 0 and [line.endswith("  valid") for line in text.splitlines()] == [False, True, True, False]
    fs, root = _raw(store_url)
    _flip(fs, f"{root}/step-000000002")
    assert run_verify(ck1, options)[1] == 0
    text, code = run_verify(ck2 + "/", options)
    assert code == 1 and "INVALID: state.pt: sha256 mismatch" in text
    listing = describe_listing(store)
    assert "loss=0.25" in listing and "valid" in listing and listing.count("\n") == 2


def test_open_checkpoint(store_url):
    url, options = store_url
    ck = _commit(_store(store_url), 5)
    store, info = open_checkpoint(ck, options)
    assert isinstance(info, CheckpointInfo) and (info.step, info.valid, info.url) == (5, True, ck)
    assert store.read(info) == b"state 5" * 10
    with pytest.raises(CheckpointError, match="step-000000006"):
        open_checkpoint(ck.replace("000000005", "000000006"), options)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        store.read(url + "/other")


def test_unknown_protocol_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match=r"nosuchproto://bucket/ckpt.*s3://"):
        CheckpointStore("nosuchproto://bucket/ckpt")


@pytest.mark.parametrize("proto, module, extra", [("gs", "gcsfs", "gcs"), ("az", "adlfs", "azure"),
                                                   ("s3", "s3fs", "s3")])
def test_missing_backend_names_the_pip_extra(monkeypatch, proto, module, extra):
    monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, proto, raising=False)
    monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    with pytest.raises(CheckpointError, match=rf"{proto}://bucket/ckpt.*pip install 'runner-train\[{extra}\]'"):
        CheckpointStore(f"{proto}://bucket/ckpt")


def test_bad_file_names_and_meta_are_rejected(tmp_path):
    store = CheckpointStore(str(tmp_path))
    for name in ("../x", MANIFEST, ".hidden", ""):
        with pytest.raises(CheckpointError):
            store.commit(1, {name: b"x"}, {})
    with pytest.raises(CheckpointError, match="not JSON"):
        store.commit(1, {"state.pt": b"x"}, {"bad": object()})
    assert store.list() == [] and not any(tmp_path.iterdir())


# --- rewriting a step on object stores -------------------------------------------------------------------

def _referenced(fs, d) -> set[str]:
    return {MANIFEST} | {e.get("object", n) for n, e in _manifest(fs, d)["files"].items()}


def test_failed_rewrite_of_a_step_keeps_the_old_checkpoint(store_url, monkeypatch):
    store = _store(store_url)
    url = _commit(store, 5, payload=b"old" * 10)
    fs, root = _raw(store_url)
    d = f"{root}/step-000000005"

    def connection_lost():  # between the data and the manifest: the worst moment
        raise ConnectionResetError("connection reset by peer")

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "_test_pause", connection_lost)
        with pytest.raises(StorageUnavailable, match="step-000000005.*ConnectionResetError"):
            _commit(store, 5, payload=b"new" * 20)
    assert [(i.step, i.valid) for i in store.list()] == [(5, True)]
    assert store.read(url) == b"old" * 10 and store.verify(url).valid
    leftovers = _files(fs, d) - _referenced(fs, d)
    assert bool(leftovers) == (not store.local)  # local: the temp dir went; object stores: the new data objects
    assert sorted(store.cleanup_partial()) == sorted(f"{url}/{name}" for name in leftovers)
    assert _files(fs, d) == _referenced(fs, d)

    _commit(store, 5, payload=b"new" * 20)
    assert store.read(url) == b"new" * 20 and store.verify(url).valid
    assert _files(fs, d) == _referenced(fs, d)  # the old version's objects are gone
    assert _children(store_url) == {"step-000000005"}


def test_a_streamed_file_is_hashed_on_the_way_and_reads_back(store_url):
    """A file given as a writer function (how runner saves state.pt: torch.save streams into the store) gets
    the same manifest entry as its bytes would, whatever sizes its writes come in (large ones are hashed on a
    second thread while they are written; multipart upload on S3)."""
    data = os.urandom(3 << 20) + b"tail"
    cuts = [0, 5, 2 << 20, (2 << 20) + 1, len(data)]

    def write(out):
        for a, b in zip(cuts, cuts[1:]):
            out.write(memoryview(data)[a:b])

    store = _store(store_url)
    url = store.commit(4, {"state.pt": write, "extra.bin": b"x"}, {})
    entry = store.info(url).manifest["files"]["state.pt"]
    assert (entry["size"], entry["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    assert store.read(url) == data and store.verify(url).valid


def test_a_writer_that_fails_commits_nothing_and_keeps_the_previous_version(store_url):
    """A state that cannot be serialized is the writer's fault, not the storage's: one line naming the file
    (not a retryable storage error), and the step's committed version stays whole."""
    store = _store(store_url)
    url = _commit(store, 5, payload=b"old" * 10)

    def broken(out):
        out.write(b"half of it")
        raise TypeError("cannot pickle 'generator' object")

    with pytest.raises(CheckpointError, match=r"state\.pt.*TypeError: cannot pickle") as e:
        store.commit(5, {"state.pt": broken}, {})
    assert storage_fault(e.value) == "permanent" and "\n" not in str(e.value)
    assert store.read(url) == b"old" * 10 and store.verify(url).valid
    store.cleanup_partial()
    fs, root = _raw(store_url)
    assert _files(fs, f"{root}/step-000000005") == _referenced(fs, f"{root}/step-000000005")


def test_a_local_rewrite_killed_between_its_renames_keeps_the_committed_checkpoint(tmp_path, monkeypatch):
    """The old version is moved aside before the new one is renamed in; a kill in between must not lose it."""
    store = CheckpointStore(str(tmp_path / "ckpt"))
    url = _commit(store, 5, payload=b"old" * 10)
    real_replace = os.replace

    def killed_at_the_second_rename(src, dst):
        if ".tmp-" in str(src):
            raise KeyboardInterrupt  # the process dies here: step-5 is aside, the new one still a temp dir
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed_at_the_second_rename)
        with pytest.raises(KeyboardInterrupt):
            _commit(store, 5, payload=b"new" * 20)
    assert store.list() == []  # for now step 5 is missing…
    store.cleanup_partial()    # …and the next start's cleanup puts the committed version back
    assert [(i.step, i.valid) for i in store.list()] == [(5, True)] and store.read(url) == b"old" * 10
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-000000005"]


def test_cleanup_partial_removes_objects_no_manifest_references(store_url):
    store = _store(store_url)
    url = _commit(store, 1)
    _commit(store, 2)
    fs, root = _raw(store_url)
    _put(fs, f"{root}/step-000000001/state.0123456789ab.pt", b"a failed rewrite")
    _put(fs, f"{root}/step-000000002/state.0123456789ab.pt", b"a failed rewrite")
    _truncate(fs, f"{root}/step-000000002")  # invalid: left as evidence, whatever it holds
    _put(fs, f"{root}/.probe-0123456789ab", b"someone's probe")
    assert store.cleanup_partial() == [f"{url}/state.0123456789ab.pt"]
    assert _files(fs, f"{root}/step-000000001") == _referenced(fs, f"{root}/step-000000001")
    assert "state.0123456789ab.pt" in _files(fs, f"{root}/step-000000002")
    assert ".probe-0123456789ab" in _children(store_url) and store.read(url) == b"state 1" * 10


# --- crafted or garbled manifests ------------------------------------------------------------------------

_ABC = {"size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}


def _crafted(**changes) -> bytes:
    return json.dumps({"step": 2, "epoch": 1, "files": {"state.pt": _ABC}, **changes}).encode()


def _nested(depth: int):
    return {"a": _nested(depth - 1)} if depth else 1


@pytest.mark.parametrize("blob, reason", [
    (b"[" * 100_000, "manifest unreadable"),
    (b"\xff\xfe not json", "manifest unreadable"),
    (b"[1, 2]", "manifest malformed: not a JSON object"),
    (_crafted(config=_nested(200)), "nested deeper than"),
    (_crafted(files=[1]), "no 'files' object"),
    (_crafted(files={"state.pt": [3]}), "state.pt: entry is not an object"),
    (_crafted(files={"state.pt": {**_ABC, "size": "3"}}), "state.pt: size '3' is not a non-negative integer"),
    (_crafted(files={"state.pt": {**_ABC, "size": True}}), "state.pt: size True is not"),
    (_crafted(files={"state.pt": {**_ABC, "size": -3}}), "state.pt: size -3 is not"),
    (_crafted(files={"state.pt": {**_ABC, "size": 3.0}}), "state.pt: size 3.0 is not"),
    (_crafted(files={"state.pt": {**_ABC, "sha256": 7}}), "state.pt: sha256 7 is not 64 hex digits"),
    (_crafted(files={"state.pt": {**_ABC, "object": "../step-000000001/state.pt"}}), "object '../step-00"),
    (_crafted(files={"../state.pt": _ABC}), "file name '../state.pt' is not a plain name"),
    (_crafted(step="2"), "manifest step '2' != directory step 2"),
    (_crafted(step=2.0), "manifest step 2.0 != directory step 2"),
])
def test_crafted_manifest_makes_only_that_checkpoint_invalid(store_url, blob, reason):
    url, options = store_url
    store = _store(store_url)
    good = _commit(store, 1)
    fs, root = _raw(store_url)
    _put(fs, f"{root}/step-000000002/state.pt", b"abc")
    _put(fs, f"{root}/step-000000002/{MANIFEST}", blob)
    bad = good.replace("000000001", "000000002")
    infos = store.list()
    assert [(i.step, i.valid) for i in infos] == [(1, True), (2, False)] and infos[1].manifest is None
    assert reason in infos[1].reason
    assert reason in store.info(bad).reason and reason in store.verify(bad).reason
    with pytest.raises(CorruptCheckpoint, match="step-000000002") as err:
        store.read(bad)
    assert reason in err.value.reason and "\n" not in str(err.value)
    warnings = []
    assert store.read_latest(warn=warnings.append)[0].url == good
    assert len(warnings) == 1 and bad in warnings[0] and reason in warnings[0]
    assert store.latest_valid(warn=lambda m: None).url == good
    assert store.prune(keep_last=1) == [] and store.cleanup_partial() == []  # newer than the newest valid one
    row = describe_listing(store).splitlines()[2]
    assert row.startswith("2 ") and "INVALID: " in row and reason in row
    text, code = run_verify(url, options)
    assert code == 1 and "2 checkpoint(s) verified, 1 invalid" in text
    assert run_verify(bad, options)[1] == 1


def test_metrics_that_are_not_an_object_are_ignored_not_fatal(store_url):
    store = _store(store_url)
    urls = [_commit(store, 1, loss=0.1), _commit(store, 2, loss=0.5)]
    odd = store.commit(3, {"state.pt": b"abc"}, {"epoch": 1, "metrics": [1, 2]})
    info = store.list()[-1]
    assert (info.valid, info.manifest["metrics"], info.note) == (True, {}, "metrics ignored: not a JSON object")
    assert "valid (metrics ignored: not a JSON object)" in describe_listing(store)
    assert store.prune(keep_last=1, keep_best=1, metric="loss") == [urls[1]]  # keeps 3 (last) and 1 (best)
    assert store.read(odd) == b"abc"


def test_step_directories_with_non_ascii_digits_are_not_checkpoints(store_url):
    store = _store(store_url)
    good = _commit(store, 1)
    fs, root = _raw(store_url)
    _put(fs, f"{root}/step-\u0666/state.pt", b"abc")  # ARABIC-INDIC DIGIT SIX: int() reads it as 6
    _put(fs, f"{root}/step-\u0666/{MANIFEST}", _crafted(step=6))
    assert [i.url for i in store.list()] == [good]
    assert store.cleanup_partial() == [] and store.prune(keep_last=1) == []
    assert "step-\u0666" in _children(store_url)
    with pytest.raises(CheckpointError, match="does not name a checkpoint directory"):
        open_checkpoint(good.replace("step-000000001", "step-\u0666"), store_url[1])
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        store.read(good.replace("step-000000001", "step-\u0666"))


# --- storage faults: classified once, retried when that can help ------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raised(fn) -> BaseException:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 — whatever it is, the test classifies it
        return e
    raise AssertionError("expected an exception")


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """retry_transient's pauses, recorded instead of slept."""
    pauses: list[float] = []
    monkeypatch.setattr(storage_faults, "_sleep", pauses.append)
    return pauses


@contextlib.contextmanager
def _credentials_checked(s3_server):
    """The moto server accepts any credentials unless told otherwise: tell it, for a moment."""
    def set_no_auth_count(value: bytes):
        req = urllib.request.Request(f"{s3_server}/moto-api/reset-auth", data=value, method="POST",
                                     headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).close()

    set_no_auth_count(b"0")
    try:
        yield
    finally:
        set_no_auth_count(b"inf")


def _no_aws_credentials(monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def _unreachable_s3(s3_store_url) -> tuple[str, dict]:
    url, _ = s3_store_url
    return url, {"endpoint_url": f"http://127.0.0.1:{_closed_port()}", "skip_instance_cache": True,
                 "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1, "read_timeout": 1}}


def test_storage_fault_on_what_backends_really_raise(s3_server, s3_store_url, monkeypatch, tmp_path):
    url, options = s3_store_url
    bucket = url.split("/")[2]
    (tmp_path / "file").write_bytes(b"")
    real = {
        "no such local dir": lambda: os.makedirs("/proc/nope/ckpt"),
        "file as parent": lambda: os.makedirs(tmp_path / "file" / "ckpt"),
        "permission denied": lambda: open("/sys/nope", "wb"),
        "not JSON": lambda: json.dumps({"x": object()}),
        "no such bucket": lambda: s3fs.S3FileSystem(**options).pipe_file(f"nobucket-{bucket}/x", b"x"),
        "connection refused": lambda: s3fs.S3FileSystem(**_unreachable_s3(s3_store_url)[1], key="a",
                                                        secret="b").cat_file(f"{bucket}/x"),
        "socket refused": lambda: socket.create_connection(("127.0.0.1", _closed_port()), timeout=5),
    }
    raised = {what: _raised(fn) for what, fn in real.items()}
    with _credentials_checked(s3_server):
        wrong = s3fs.S3FileSystem(**options, key="AKIAWRONG", secret="wrong")
        raised["wrong credentials"] = _raised(lambda: wrong.pipe_file(f"{bucket}/x", b"x"))
    _no_aws_credentials(monkeypatch)
    raised["no credentials"] = _raised(lambda: s3fs.S3FileSystem(**options).pipe_file(f"{bucket}/x", b"x"))
    with socket.create_server(("127.0.0.1", 0)) as server:  # listens, never answers
        raised["socket timeout"] = _raised(
            lambda: socket.create_connection(server.getsockname(), timeout=0.2).recv(1))
    assert type(raised["no such bucket"]) is FileNotFoundError and "bucket" in str(raised["no such bucket"])
    assert type(raised["wrong credentials"]) is PermissionError  # what s3fs makes of InvalidAccessKeyId
    assert type(raised["no credentials"]).__name__ == "NoCredentialsError"  # botocore's, not an OSError
    assert type(raised["connection refused"]).__name__ == "EndpointConnectionError"
    transient = {"connection refused", "socket refused", "socket timeout"}
    assert {what: storage_fault(e) for what, e in raised.items()} == {
        what: "transient" if what in transient else "permanent" for what in raised}


def _client_error(code: str, status: int):
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


@pytest.mark.parametrize("exc, fault", [
    (translate_boto_error(_client_error("SlowDown", 503)), "transient"),  # s3fs: OSError(EBUSY) from ClientError
    (translate_boto_error(_client_error("InternalError", 500)), "transient"),
    (translate_boto_error(_client_error("Weird", 502)), "transient"),
    (translate_boto_error(_client_error("RequestTimeout", 400)), "transient"),
    (translate_boto_error(_client_error("SignatureDoesNotMatch", 403)), "permanent"),
    (translate_boto_error(_client_error("AccessDenied", 403)), "permanent"),
    (_client_error("Throttling", 400), "transient"),
    (ConnectTimeoutError(endpoint_url="http://x"), "transient"),
    (ReadTimeoutError(endpoint_url="http://x"), "transient"),
    (ConnectionClosedError(endpoint_url="http://x"), "transient"),
    (PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"), "permanent"),
    (OSError(errno.EROFS, "Read-only file system"), "permanent"),
    (OSError(errno.ENOSPC, "No space left on device"), "transient"),  # pruning or a person can free space
    (StorageUnavailable("cannot read x: TimeoutError"), "transient"),
    (StorageError("cannot read x: PermissionError"), "permanent"),
    (CorruptCheckpoint("x is corrupt"), "permanent"),
])
def test_storage_fault_on_wrapped_and_botocore_errors(exc, fault):
    assert storage_fault(exc) == fault


def _raise(exc):
    raise exc


def test_retry_transient_retries_with_backoff_then_gives_up(sleeps):
    outcomes = [ConnectionResetError("reset"), TimeoutError("timed out"), "done"]

    def flaky():
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert retry_transient(flaky, "reading x") == "done" and sleeps == [1.0, 2.0]
    with pytest.raises(StorageUnavailable, match=r"^reading x failed 3 times; last error: TimeoutError: late$"):
        retry_transient(lambda: _raise(TimeoutError("late")), "reading x")
    sleeps.clear()
    with pytest.raises(PermissionError):
        retry_transient(lambda: _raise(PermissionError("denied")), "reading x")
    assert sleeps == []


def _failing_reads(monkeypatch, store, suffix: str, exc: Exception, times: int) -> list[str]:
    """store.fs.cat_file raises `exc` for paths ending in `suffix`, the first `times` times."""
    failed, real = [], store.fs.cat_file

    def cat_file(path, *args, **kwargs):
        if path.endswith(suffix) and len(failed) < times:
            failed.append(path)
            raise exc
        return real(path, *args, **kwargs)

    monkeypatch.setattr(store.fs, "cat_file", cat_file)
    return failed


def _two_checkpoints(store_url) -> tuple[CheckpointStore, str]:
    """A store holding steps 1 and 2, and the stored object of step 2's state.pt (relative to the store)."""
    store = _store(store_url)
    _commit(store, 1)
    _commit(store, 2)
    fs, root = _raw(store_url)
    return store, _stored(fs, f"{root}/step-000000002")[len(root) + 1:]


def test_read_latest_retries_a_transient_error_instead_of_skipping_the_newest(store_url, monkeypatch, sleeps):
    store, state_object = _two_checkpoints(store_url)
    failed = _failing_reads(monkeypatch, store, state_object, TimeoutError("read timed out"), times=1)
    warnings = []
    info, data = store.read_latest(warn=warnings.append)
    assert (info.step, data) == (2, b"state 2" * 10) and warnings == []
    assert len(failed) == 1 and sleeps == [1.0]


def test_read_latest_raises_when_the_newest_stays_unreachable(store_url, monkeypatch, sleeps):
    store, state_object = _two_checkpoints(store_url)
    _failing_reads(monkeypatch, store, state_object, TimeoutError("read timed out"), times=99)
    warnings = []
    with pytest.raises(StorageUnavailable, match=r"step-000000002/state.pt failed 3 times.*TimeoutError") as err:
        store.read_latest(warn=warnings.append)
    assert "\n" not in str(err.value) and warnings == [] and sleeps == [1.0, 2.0]
    assert StorageUnavailable.exit_status == 1 and StorageError.exit_status == 2 == CheckpointError.exit_status


def test_read_latest_does_not_retry_or_skip_on_a_permanent_error(store_url, monkeypatch, sleeps):
    store, state_object = _two_checkpoints(store_url)
    _failing_reads(monkeypatch, store, state_object, PermissionError(errno.EACCES, "Permission denied"), times=99)
    warnings = []
    with pytest.raises(StorageError, match=r"cannot read .*step-000000002/state.pt: PermissionError"):
        store.read_latest(warn=warnings.append)
    assert warnings == [] and sleeps == []


def test_read_latest_skips_a_corrupt_newest(store_url, sleeps):
    store, _ = _two_checkpoints(store_url)
    fs, root = _raw(store_url)
    _flip(fs, f"{root}/step-000000002")  # same size: only reading it can tell
    warnings = []
    assert store.read_latest(warn=warnings.append)[0].step == 1
    assert len(warnings) == 1 and "step-000000002: state.pt: sha256 mismatch; falling back" in warnings[0]
    assert sleeps == []


# --- probe ------------------------------------------------------------------------------------------------

def test_probe_succeeds_and_leaves_nothing_behind(store_url, sleeps):
    store = _store(store_url)
    store.probe()
    assert _children(store_url) == set() and store.list() == [] and sleeps == []
    if store.local:
        assert os.path.isdir(store.url)  # created, ready for the first checkpoint
    _commit(store, 1)
    store.probe()
    assert _children(store_url) == {"step-000000001"}


@pytest.mark.parametrize("where, cause", [("/proc/nope/ckpt", "FileNotFoundError"),
                                          ("{tmp}/file/ckpt", "NotADirectoryError")])
def test_probe_refuses_an_unusable_local_path(tmp_path, sleeps, where, cause):
    (tmp_path / "file").write_bytes(b"")
    url = where.format(tmp=tmp_path)
    with pytest.raises(StorageError, match=rf"^cannot .* {re.escape(url)}: {cause}: .*check the path") as err:
        CheckpointStore(url).probe()
    assert "\n" not in str(err.value) and sleeps == []


def test_probe_refuses_wrong_s3_credentials(s3_server, s3_store_url, sleeps):
    url, options = s3_store_url
    store = CheckpointStore(url, {**options, "key": "AKIAWRONG", "secret": "wrong"})
    with _credentials_checked(s3_server), pytest.raises(
            StorageError, match=rf"{url}: PermissionError: The AWS Access Key Id you provided"):
        store.probe()
    assert sleeps == []


def test_probe_refuses_missing_s3_credentials_and_bucket(s3_store_url, monkeypatch, sleeps):
    url, options = s3_store_url
    with pytest.raises(StorageError, match=r"nobucket-.*: FileNotFoundError: The specified bucket does not exist"):
        CheckpointStore(url.replace("s3://", "s3://nobucket-"), options).probe()
    _no_aws_credentials(monkeypatch)
    with pytest.raises(StorageError, match=rf"{url}: NoCredentialsError: Unable to locate credentials"):
        CheckpointStore(url, options).probe()
    assert sleeps == []


def test_probe_reports_an_unreachable_s3_endpoint_after_retrying(s3_store_url, sleeps):
    url, options = _unreachable_s3(s3_store_url)
    with pytest.raises(StorageUnavailable, match=rf"^probing {url} failed 3 times.*EndpointConnectionError") as err:
        CheckpointStore(url, options).probe()
    assert "\n" not in str(err.value) and sleeps == [1.0, 2.0]


# --- directory fsync --------------------------------------------------------------------------------------

@pytest.mark.parametrize("code, commits", [(errno.EINVAL, True), (errno.EOPNOTSUPP, True), (errno.EIO, False)])
def test_filesystems_that_cannot_fsync_a_directory(tmp_path, monkeypatch, code, commits):
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store = CheckpointStore(str(tmp_path / "ckpt"))
    if commits:
        assert store.read(store.commit(1, {"state.pt": b"abc"}, {})) == b"abc"
    else:
        with pytest.raises(StorageError, match=r"cannot write checkpoint .*step-000000001: OSError: \[Errno 5\]"):
            store.commit(1, {"state.pt": b"abc"}, {})
        assert store.list() == [] and os.listdir(tmp_path / "ckpt") == []


# --- retention --------------------------------------------------------------------------------------------

def test_prune_never_ranks_nan_or_infinite_metrics_best(store_url):
    store = _store(store_url)
    losses = {1: math.nan, 2: 0.3, 3: -math.inf, 4: 0.5, 5: math.inf, 6: 0.4, 7: 0.45}
    urls = {s: _commit(store, s, loss) for s, loss in losses.items()}
    assert sorted(store.prune(keep_last=1, keep_best=1, metric="loss", mode="min")) == sorted(
        urls[s] for s in (1, 3, 4, 5, 6))
    assert [i.step for i in store.list()] == [2, 7]
    assert store.prune(keep_last=1, keep_best=1, metric="loss", mode="max") == [urls[2]]  # 7 is both


def test_prune_with_run_id_touches_only_that_run(store_url):
    store = _store(store_url)
    fs, root = _raw(store_url)
    _put(fs, f"{root}/step-000000000/state.pt", b"half")  # no manifest: nobody's run
    runs = {1: "a", 2: "a", 3: None, 4: "a", 5: "b", 6: "b", 7: "b", 8: "a"}
    urls = {s: store.commit(s, {"state.pt": b"x"}, {} if run is None else {"run_id": run}) for s, run in runs.items()}
    fs.pipe_file(_stored(fs, f"{root}/step-000000007"), b"")  # run b's newest is broken: its newest valid is 6
    assert store.prune(keep_last=1, run_id="b") == [urls[5]]  # 7 is newer than b's newest valid: left alone
    assert store.prune(keep_last=2, run_id="a") == [urls[1], urls[2]]
    assert store.prune(keep_last=1, run_id="legacy") == []
    assert _children(store_url) == {f"step-{s:09d}" for s in (0, 3, 4, 6, 7, 8)}
    assert store.prune(keep_last=1, run_id="c") == []
