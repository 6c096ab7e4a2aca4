"""Sharded checkpoints (runner.store.sharded): DCP files under the store's commit rule, on every backend, and loads
that never run code from a checkpoint."""

import copy
import hashlib
import json
import os
import pickle
import socket
import time
from pathlib import Path

import fsspec
import pytest
import torch

from helpers import REPO, run_torchrun
from runner.errors import CheckpointError, CorruptCheckpoint, StorageUnavailable
from runner.store import CheckpointStore, MANIFEST
from runner.store import sharded
from runner.store.manifest import stored_object


def _store(store_url) -> CheckpointStore:
    url, options = store_url
    return CheckpointStore(url, options)


def _raw(store_url):
    url, options = store_url
    return fsspec.core.url_to_fs(url, **options)


def _files(fs, d) -> set[str]:
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[-1] for p in fs.find(d)}


def _state(seed: int = 0) -> dict:
    """Model and AdamW state of a small network after one step, and plain values besides."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(5, 6)).pow(2).mean().backward()
    opt.step()
    return {"model": model.state_dict(), "optim": opt.state_dict(),
            "run": {"epoch": 3 + seed, "tag": f"seed {seed}", "history": [0.5, 0.25], "nested": {"k": [1, 2]}}}


def _blank(state: dict) -> dict:
    """A load target shaped like `state`: zero tensors, other values changed."""
    target = copy.deepcopy(state)
    target["model"] = {k: torch.zeros_like(v) for k, v in state["model"].items()}
    for entry in target["optim"]["state"].values():
        for k, v in entry.items():
            entry[k] = torch.zeros_like(v)
    target["run"] = {"epoch": -1, "tag": "", "history": [], "nested": {"k": []}}
    return target


def _assert_identical(a, b, where="state"):
    assert type(a) is type(b) or isinstance(a, dict) and isinstance(b, dict), where  # OrderedDict == dict
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _save(store, step, state, extra=b"rank file", files_per_rank=2, commit=True, meta=None):
    attempt = sharded.new_attempt()
    entries = sharded.save_shards(store, step, attempt, state, files_per_rank=files_per_rank)
    entries |= sharded.write_file(store, step, attempt, "rank-00000.bin", extra)
    if not commit:
        return attempt, None
    return attempt, sharded.commit_shards(store, step, attempt, entries, meta or {"epoch": step})


def _shards(info) -> list[str]:
    return sorted(n for n in info.manifest["files"] if n.endswith(".distcp"))


def test_a_sharded_checkpoint_commits_verifies_and_loads_back_bit_identical(store_url):
    store, state = _store(store_url), _state()
    attempt, url = _save(store, 7, state, meta={"epoch": 2, "metrics": {"loss": 0.5}})
    [info] = store.list()
    assert (info.step, info.valid, info.reason, info.url) == (7, True, "", url)
    assert store.verify(url).valid
    assert info.manifest["sharded"] == {"metadata": f"dcp-{attempt}.metadata", "attempt": attempt}
    assert info.manifest["epoch"] == 2 and info.manifest["metrics"] == {"loss": 0.5}
    assert _shards(info) == [f"shard-{attempt}-0-0.distcp", f"shard-{attempt}-0-1.distcp"]
    fs, root = _raw(store_url)
    stored = {stored_object(n, e) for n, e in info.manifest["files"].items()}
    assert _files(fs, f"{root}/step-000000007") == stored | {MANIFEST}  # nothing else, nothing left aside
    assert store.read(info, "rank-00000.bin") == b"rank file"
    target = _blank(state)
    sharded.load_shards(store, info, target)
    _assert_identical(state, target)
    # another process, in effect: a fresh store object, loading by URL
    again = _blank(state)
    sharded.load_shards(_store(store_url), url, again)
    _assert_identical(state, again)


def test_a_failed_recommit_keeps_the_previous_checkpoint_and_cleanup_removes_its_leftovers(store_url):
    store, old, new = _store(store_url), _state(0), _state(1)
    _, url = _save(store, 4, old, extra=b"old")
    # attempt 2 writes every shard and file of step 4, then dies before commit_shards
    crashed, _ = _save(store, 4, new, extra=b"new", commit=False)
    for s in (store, _store(store_url)):
        [info] = s.list()
        assert info.valid and s.verify(url).valid and s.read(info, "rank-00000.bin") == b"old"
        target = _blank(old)
        sharded.load_shards(s, info, target)
        _assert_identical(old, target)
    fs, root = _raw(store_url)
    assert any(crashed in name for name in _files(fs, root))  # its leftovers are there
    removed = store.cleanup_partial()
    assert removed and all(crashed in r for r in removed)
    assert not any(crashed in name for name in _files(fs, root))
    [info] = store.list()
    assert store.verify(info).valid
    # and a successful re-commit replaces it
    attempt, _ = _save(store, 4, new, extra=b"new")
    [info] = store.list()
    assert store.verify(info).valid and store.read(info, "rank-00000.bin") == b"new"
    assert all(attempt in n for n in _files(fs, f"{root}/step-000000004") - {MANIFEST, "rank-00000.bin"})
    target = _blank(new)
    sharded.load_shards(store, info, target)
    _assert_identical(new, target)


def test_discard_attempt_removes_a_failed_attempt_and_nothing_else(store_url):
    store, state = _store(store_url), _state()
    _save(store, 3, state)
    before = _files(*_raw(store_url))
    failed, _ = _save(store, 3, _state(1), commit=False)
    sharded.discard_attempt(store, 3, failed)
    assert _files(*_raw(store_url)) == before
    assert store.verify(store.list()[0]).valid


def _flip(fs, path):
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(path, bytes(data))


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_a_damaged_shard_is_named_by_verify(store_url, damage):
    store = _store(store_url)
    _, url = _save(store, 9, _state())
    [info] = store.list()
    shard = _shards(info)[1]
    fs, root = _raw(store_url)
    path = f"{root}/step-000000009/{shard}"
    if damage == "flip":
        _flip(fs, path)
        assert store.verify(url).reason == f"{shard}: sha256 mismatch"
    else:
        fs.rm_file(path)
        assert store.verify(url).reason == f"{shard}: missing"
        with pytest.raises(CorruptCheckpoint, match=f"{shard}: missing"):
            sharded.load_shards(store, url, _blank(_state()))
    assert store.latest_valid(warn=lambda msg: None) is None


class _Evil:
    """Pickles as a call of eval that creates a marker file: what loading must never run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def _rewrite_in_manifest(store, url, name, blob):
    """Replace file `name` and fix its manifest entry: a crafted checkpoint that verifies."""
    d = store.fs._strip_protocol(url)
    store.fs.pipe_file(f"{d}/{name}", blob)
    manifest = json.loads(store.fs.cat_file(f"{d}/{MANIFEST}"))
    manifest["files"][name] = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    store.fs.pipe_file(f"{d}/{MANIFEST}", json.dumps(manifest).encode())


def test_crafted_dcp_metadata_is_refused_in_one_line_and_never_runs(tmp_path):
    store, state = CheckpointStore(str(tmp_path / "ckpt")), _state()
    attempt, url = _save(store, 2, state)
    marker = tmp_path / "ran"
    meta_file = sharded.metadata_name(attempt)
    _rewrite_in_manifest(store, url, meta_file, pickle.dumps(_Evil(marker)))
    assert store.verify(url).valid  # the manifest cannot tell: the loader must
    with pytest.raises(CorruptCheckpoint) as caught:
        sharded.load_shards(store, url, _blank(state))
    message = str(caught.value)
    assert "\n" not in message and meta_file in message and "builtins.eval" in message, message
    assert not marker.exists()
    # a metadata file that does not match its manifest is refused before it is unpickled
    (Path(url) / meta_file).write_bytes(pickle.dumps(_Evil(marker)) + b" ")
    with pytest.raises(CorruptCheckpoint, match=f"{meta_file}: size"):
        sharded.load_shards(store, url, _blank(state))
    assert not marker.exists()


def test_a_crafted_non_tensor_value_is_refused_and_never_runs(tmp_path):
    store, marker = CheckpointStore(str(tmp_path / "ckpt")), tmp_path / "ran"
    state = {"model": _state()["model"], "run": {"epoch": 1, "hook": _Evil(marker)}}
    _, url = _save(store, 5, state, files_per_rank=1)
    assert not marker.exists() and store.verify(url).valid
    target = {"model": _blank(_state())["model"], "run": {"epoch": 0, "hook": None}}
    with pytest.raises(CorruptCheckpoint) as caught:
        sharded.load_shards(store, url, target)
    message = str(caught.value)
    assert "\n" not in message and "'run.hook'" in message and ".distcp" in message and "eval" in message, message
    assert not marker.exists()
    # the rest of the state stays loadable: a target without the crafted value
    plain = {"model": _blank(_state())["model"], "run": {"epoch": 0}}
    sharded.load_shards(store, url, plain)
    assert plain["run"] == {"epoch": 1} and not marker.exists()
    _assert_identical(state["model"], plain["model"])


def test_commit_refuses_bad_input_before_writing_anything(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    attempt = sharded.new_attempt()
    entries = sharded.save_shards(store, 1, attempt, {"w": torch.ones(3)})
    with pytest.raises(CheckpointError, match="not JSON"):
        sharded.commit_shards(store, 1, attempt, entries, {"bad": object()})
    assert store.list() == []
    with pytest.raises(CheckpointError, match="invalid checkpoint file name"):
        sharded.write_file(store, 1, attempt, "../escape", b"x")
    with pytest.raises(CheckpointError, match="DCP's names"):
        sharded.write_file(store, 1, attempt, f"dcp-{attempt}.metadata", b"x")
    with pytest.raises(CheckpointError, match="attempt id"):
        sharded.save_shards(store, 1, "../x", {"w": torch.ones(3)})
    # an entry rank 0 cannot see (a rank that wrote elsewhere) is refused, not committed
    ghost = {**entries, "rank-00001.bin": {"size": 3, "sha256": "0" * 64}}
    with pytest.raises(CheckpointError, match="rank-00001.bin: missing"):
        sharded.commit_shards(store, 1, attempt, ghost, {})
    assert store.list() == [] and not os.listdir(tmp_path / "ckpt")
    # the same attempt id twice is refused by DCP, in one line
    attempt = sharded.new_attempt()
    sharded.save_shards(store, 2, attempt, {"w": torch.ones(3)})
    with pytest.raises(CheckpointError, match="already exists") as caught:
        sharded.save_shards(store, 2, attempt, {"w": torch.ones(3)})
    assert "\n" not in str(caught.value)


def test_loading_an_ordinary_checkpoint_as_sharded_is_refused(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    url = store.commit(1, {"state.pt": b"x"}, {})
    with pytest.raises(CheckpointError, match="names no DCP metadata"):
        sharded.load_shards(store, url, {"w": torch.zeros(1)})


@pytest.mark.slow
def test_fsdp2_sharded_save_loads_into_a_plain_model_and_on_another_world_size(tmp_path):
    from sharded_worker import build_model

    worker, store_dir, start = REPO / "tests" / "sharded_worker.py", tmp_path / "ckpt", time.monotonic()
    for mode, nproc in (("save", 2), ("load", 1)):
        proc = run_torchrun(mode, store_dir, tmp_path, nproc=nproc, entry=(worker,), timeout=120)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    store = CheckpointStore(str(store_dir))
    [info] = store.list()
    assert store.verify(info).valid and info.manifest["world_size"] == 2
    names = set(info.manifest["files"])
    attempt = info.manifest["sharded"]["attempt"]
    assert {f"shard-{attempt}-0-0.distcp", f"shard-{attempt}-1-0.distcp", "rank-00000.bin",
            "rank-00001.bin"} <= names
    assert store.read(info, "rank-00001.bin") == b"rank 1"
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    # one process, no process group: the model's weights only, into a plain module
    model = build_model()
    sd = model.state_dict()
    sharded.load_shards(store, info, {"model": sd})
    model.load_state_dict(sd)
    _assert_identical(full["model"], model.state_dict())
    assert not torch.equal(build_model().state_dict()["0.weight"], sd["0.weight"])  # it trained: a real check
    # FSDP2 on one rank (saved on two) reproduces the same full model and optimizer state
    _assert_identical(full, torch.load(tmp_path / "reloaded.pt", weights_only=True))
    assert time.monotonic() - start < 90


def test_storage_failures_inside_dcp_become_one_line_storage_errors(s3_store_url):
    url, options = s3_store_url
    store, state = CheckpointStore(url, options), _state()
    _, committed = _save(store, 1, state)
    [info] = store.list()
    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    cut_off = CheckpointStore(url, {"endpoint_url": f"http://127.0.0.1:{closed}", "skip_instance_cache": True,
                                    "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}})
    with pytest.raises(StorageUnavailable) as caught:  # a transient fault: the caller may retry
        sharded.save_shards(cut_off, 2, sharded.new_attempt(), state)
    assert "\n" not in str(caught.value) and f"{url}/step-000000002" in str(caught.value)
    with pytest.raises(StorageUnavailable) as caught:
        sharded.load_shards(cut_off, info, _blank(state))
    assert "\n" not in str(caught.value) and f"{committed}/dcp-" in str(caught.value)
