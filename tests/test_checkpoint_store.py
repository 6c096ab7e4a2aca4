"""One storage suite that every backend (local dir, memory://, S3 server) must pass."""

import hashlib
import json
import sys
import threading
import time

import fsspec
import pytest

from runner.checkpoint import (MANIFEST, SLOW_COMMIT_ENV, CheckpointInfo, CheckpointStore,
                               describe_listing, open_checkpoint, run_verify)
from runner.errors import CheckpointError


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
    assert manifest["files"] == {"state.pt": {"size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}}
    assert manifest["step"] == 7 and manifest["epoch"] == 1 and manifest["world_size"] == 2
    assert manifest["metrics"] == {"loss": 0.5}
    assert before <= manifest["committed_at"] <= time.time()
    assert store.list()[0].manifest == manifest == store.verify(url).manifest


def test_missing_store_dir_lists_nothing(store_url):
    store = _store(store_url)
    assert store.list() == []
    assert store.latest_valid() is None
    assert store.prune(keep_last=1) == [] and store.cleanup_partial() == []


def _truncate(fs, d):
    fs.pipe_file(f"{d}/state.pt", fs.cat_file(f"{d}/state.pt")[:-5])


def _flip(fs, d):
    data = bytearray(fs.cat_file(f"{d}/state.pt"))
    data[3] ^= 0xFF
    fs.pipe_file(f"{d}/state.pt", bytes(data))


def _drop_manifest(fs, d):
    fs.rm_file(f"{d}/{MANIFEST}")


def _drop_file(fs, d):
    fs.rm_file(f"{d}/extra.bin")


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
    monkeypatch.setenv(SLOW_COMMIT_ENV, "1.0")
    thread = threading.Thread(target=_commit, args=(store, 9))
    start = time.monotonic()
    thread.start()
    while not _children(store_url) and thread.is_alive():  # wait for the data to land
        time.sleep(0.02)
    seen = observer.list()
    assert thread.is_alive(), "commit finished before the test could look inside it"
    assert not any(i.valid for i in seen)  # data written, manifest not yet: nothing valid
    thread.join()
    assert time.monotonic() - start >= 1.0
    assert [(i.step, i.valid) for i in store.list()] == [(9, True)]
    assert not any(n.startswith(".tmp-") for n in _children(store_url))


def test_run_verify_and_listing(store_url):
    url, options = store_url
    store = _store(store_url)
    text, code = run_verify(url, options)
    assert code == 1 and "no checkpoints" in text
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
    with pytest.raises(CheckpointError, match=rf"{proto}://bucket/ckpt.*pip install 'runner\[{extra}\]'"):
        CheckpointStore(f"{proto}://bucket/ckpt")


def test_bad_file_names_and_meta_are_rejected(tmp_path):
    store = CheckpointStore(str(tmp_path))
    for name in ("../x", MANIFEST, ".hidden", ""):
        with pytest.raises(CheckpointError):
            store.commit(1, {name: b"x"}, {})
    with pytest.raises(CheckpointError, match="not JSON"):
        store.commit(1, {"state.pt": b"x"}, {"bad": object()})
    assert store.list() == [] and not any(tmp_path.iterdir())
