"""Sharded checkpoints: model and optimizer state written by every rank through torch.distributed.checkpoint (DCP),
under the store's own commit rule.

A sharded checkpoint is an ordinary checkpoint of a CheckpointStore: it exists iff its MANIFEST.json exists and
every file it lists matches in size and sha256, so `list`, `verify`, `read` (of its small files), `prune` and
`cleanup_partial` treat it like any other. Every file has a plain name in the step directory:

    step-000001234/MANIFEST.json                   written last, by rank 0: the commit point
                  /dcp-<attempt>.metadata          DCP's metadata (rank 0), written straight to this name
                  /shard-<attempt>-<rank>-<i>.distcp   DCP's data files, each rank its own
                  /<name> (object stores: <stem>.<attempt>.<ext>)   small files, e.g. a rank's RNG state

`<attempt>` is a fresh hex id per commit attempt, the same on every rank (the caller broadcasts it, `new_attempt`).
Local stores write into a `.tmp-step-<9 digits>-<attempt>` sibling that rank 0 fsyncs and renames into place
(CheckpointStore._install_local); object stores write into the step directory itself, fresh names keep a previous
commit of the step whole, and one PUT of the manifest commits (CheckpointStore._publish_object). DCP records file
names relative to its directory, so a renamed attempt loads from the step directory.

Protocol (each call says who makes it):
    attempt = new_attempt()                                    rank 0, broadcast by the caller
    entries = save_shards(store, step, attempt, state_dict)    every rank (a collective)
    entries |= write_file(store, step, attempt, name, payload) any rank, for its own small files
    gathered = all_gather_object(entries)                      the caller
    url = commit_shards(store, step, attempt, merged, meta)    rank 0 only
    load_shards(store, info, state_dict)                       every rank (a collective), or one process alone

Loading never runs code from a checkpoint: DCP's metadata is unpickled by an allowlist (SafeFsspecReader) and
non-tensor values go through torch.load(weights_only=True) (SafeLoadPlanner); stock DCP does neither
(docs/fsdp-findings.md, section 5). DCP raises CheckpointException, a BaseException; every call here turns it into
a one-line CheckpointError (StorageError / StorageUnavailable for storage failures, as storage_errors does).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pathlib
import pickle
import re
import shutil
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem as _FsspecFileSystem
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo, _StoragePrefix

from runner.errors import CheckpointError, CorruptCheckpoint, RunnerError, one_line
from runner.store.directory import (_TMP_PREFIX, CheckpointInfo, CheckpointStore, HashingWriter, Payload,
                                    _step_name, _test_pause, _write_synced)
from runner.store.faults import is_storage_exc, storage_errors
from runner.store.manifest import bytes_problem, check_files, fresh_object, size_problem

_ATTEMPT_RE = re.compile(r"[0-9a-f]{8,32}")
_NO_DIST_WARNING = "torch.distributed is disabled, unavailable or uninitialized"
SHARDED = "sharded"  # the manifest key naming a sharded checkpoint's DCP metadata and attempt


def new_attempt() -> str:
    """A fresh attempt id (16 hex digits). Make it on one rank and broadcast it: every rank must use the same."""
    return uuid.uuid4().hex[:16]


def metadata_name(attempt: str) -> str:
    """The file name of DCP's metadata in attempt `attempt`."""
    return f"dcp-{attempt}.metadata"


def _check_attempt(attempt: str) -> None:
    if not isinstance(attempt, str) or not _ATTEMPT_RE.fullmatch(attempt):
        raise CheckpointError(f"invalid checkpoint attempt id {attempt!r}: use 8 to 32 lowercase hex digits "
                              "(new_attempt())")


def _is_dcp_name(name: str) -> bool:
    return (name.startswith("shard-") and name.endswith(".distcp")) or (
        name.startswith("dcp-") and name.endswith(".metadata"))


def _attempt_path(store: CheckpointStore, step: int, attempt: str) -> str:
    """fsspec path (no protocol) of the directory attempt `attempt` of `step` writes into."""
    _check_attempt(attempt)
    if store.local:
        return store._path(f"{_TMP_PREFIX}{_step_name(step)}-{attempt}")
    return store._path(_step_name(step))


def attempt_dir(store: CheckpointStore, step: int, attempt: str) -> str:
    """The directory every rank writes attempt `attempt` of checkpoint `step` into: for a local store a
    `.tmp-step-<9 digits>-<attempt>` sibling (created here; cleanup_partial removes it if never committed), for an
    object store the step directory itself (fresh names keep a previous commit of the same step intact)."""
    path = _attempt_path(store, step, attempt)
    if store.local:
        with storage_errors("create checkpoint directory", path):
            os.makedirs(path, exist_ok=True)
    return path


# --- writing ---------------------------------------------------------------------------------------------------

class _HashingStream:
    """The file DCP writes into: each write is hashed (store.directory.HashingWriter) and counted on its way
    to the storage. DCP also needs tell() (it records offsets) and fileno() (fsync)."""

    def __init__(self, raw, hasher: ThreadPoolExecutor):
        self.raw, self.writer = raw, HashingWriter(raw, hasher)

    def write(self, data) -> int:
        return self.writer.write(data)

    def tell(self) -> int:
        return self.writer.size  # every stream is a new file, written from its start

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        self.raw.close()

    @property
    def closed(self) -> bool:
        return self.raw.closed


class _HashingFileSystem(_FsspecFileSystem):
    """DCP's fsspec filesystem, over a given fsspec filesystem, that records {name: {size, sha256}} of every
    file written through it once the file is closed (uploaded), in `files`."""

    def __init__(self, fs) -> None:
        super().__init__()
        self.fs = fs
        self.files: dict[str, dict] = {}

    def init_path(self, path, **kwargs):
        return path  # the filesystem is given: do not open another

    @contextlib.contextmanager
    def create_stream(self, path, mode: str) -> Iterator[Any]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with ThreadPoolExecutor(1, thread_name_prefix="sha256") as hasher:
            with super().create_stream(path, mode) as raw:
                stream = _HashingStream(raw, hasher)
                yield stream
        self.files[os.path.basename(os.fspath(path))] = {"size": stream.writer.size,
                                                          "sha256": stream.writer.sha.hexdigest()}


class _OneAttempt:
    """For the writer and the reader: bound to the one directory and metadata file (`metadata_name`) they were
    made for. Their metadata path is also what DCP's prepare_local_plan checks when writing: an attempt id used
    twice is refused, not overwritten."""

    def reset(self, checkpoint_id=None) -> None:
        if checkpoint_id:
            raise CheckpointError(f"{type(self).__name__} works where it was made for; pass no checkpoint_id")
        super().reset()

    def _get_metadata_path(self, rank: int | None = None):
        return self.fs.concat_path(self.path, self.metadata_name)


class HashingFsspecWriter(_OneAttempt, FsspecWriter):
    """DCP's FsspecWriter with runner's naming and hashing: data files are `shard-<attempt>-<rank>-<i>.distcp`,
    the metadata is pickled straight to `dcp-<attempt>.metadata` (no .tmp + rename: on object stores that would
    be a copy and a delete), and `files` collects {name: {"size", "sha256"}} of the files this rank wrote.
    `files_per_rank` > 1 splits each rank's data over that many files, written by as many threads."""

    def __init__(self, url: str, attempt: str, fs, *, files_per_rank: int = 1, sync_files: bool = True) -> None:
        _check_attempt(attempt)
        super().__init__(url, single_file_per_rank=True, sync_files=sync_files, thread_count=max(1, files_per_rank),
                         overwrite=False)
        self.fs = _HashingFileSystem(fs)
        self.attempt = attempt
        self.metadata_name = metadata_name(attempt)

    @property
    def files(self) -> dict[str, dict]:
        return self.fs.files

    def prepare_global_plan(self, plans):
        # plans come in rank order; the prefix is what gives each rank its own file names
        return [dataclasses.replace(plan, storage_data=_StoragePrefix(f"shard-{self.attempt}-{rank}-"))
                for rank, plan in enumerate(plans)]

    def finish(self, metadata: dcp_metadata.Metadata, results) -> None:
        metadata.version = CURRENT_DCP_VERSION
        metadata.storage_data = {wr.index: wr.storage_data for wrs in results for wr in wrs}
        metadata.storage_meta = self.storage_meta()
        with self.fs.create_stream(self._get_metadata_path(), "wb") as f:
            pickle.dump(metadata, f)
            if self.sync_files:
                f.flush()
                os.fsync(f.fileno())


# --- reading ---------------------------------------------------------------------------------------------------

def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {}
    for cls in (dcp_metadata.Metadata, dcp_metadata.MetadataIndex, dcp_metadata.StorageMeta,
                dcp_metadata.TensorProperties, dcp_metadata.TensorStorageMetadata,
                dcp_metadata.ChunkStorageMetadata, dcp_metadata.BytesStorageMetadata,
                dcp_metadata._MEM_FORMAT_ENCODING, _StorageInfo, torch.Size, OrderedDict,
                pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath):
        allowed[(cls.__module__, cls.__qualname__)] = cls
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for name, value in vars(torch).items():  # not getattr over dir(torch): that would import torch's submodules
        if isinstance(value, torch.dtype):
            allowed[("torch", name)] = value
    # pickle also names pathlib classes by their private home in some Python versions
    for cls in (pathlib.PosixPath, pathlib.PurePosixPath):
        allowed[("pathlib._local", cls.__name__)] = cls
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and nothing else: a global outside the allowlist is refused, not imported."""

    allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which is not allowed") from None


class SafeFsspecReader(_OneAttempt, FsspecReader):
    """DCP's FsspecReader that reads the metadata file `metadata` (a name in its directory) through an
    allowlisting unpickler, after checking it against its manifest entry `expected` ({"size", "sha256"}) if
    given. A refusal is kept in `refusal` (a CorruptCheckpoint naming the file) and reported to DCP as missing
    metadata, so DCP neither logs a traceback nor falls back to per-rank metadata files."""

    def __init__(self, path: str, metadata: str, fs, expected: dict | None = None, url: str | None = None) -> None:
        super().__init__(path)
        self.fs = _HashingFileSystem(fs)  # reads pass straight through
        self.metadata_name, self.expected, self.url = metadata, expected, url or path
        self.refusal: BaseException | None = None

    def load_metadata(self) -> dcp_metadata.Metadata:
        """DCP's metadata, unpickled safely; raises CorruptCheckpoint (refused or damaged) or a storage error."""
        where = f"{self.url}/{self.metadata_name}"
        with storage_errors("read", where):
            with self.fs.create_stream(self._get_metadata_path(), "rb") as f:
                blob = f.read()
        if self.expected is not None and (reason := bytes_problem(self.metadata_name, blob, self.expected)):
            raise CorruptCheckpoint(f"{where} is corrupt ({reason}); delete it or resume from an earlier checkpoint",
                                    reason)
        try:
            metadata = _MetadataUnpickler(io.BytesIO(blob)).load()
        except Exception as e:  # pickle raises many kinds on a crafted or damaged stream
            raise CorruptCheckpoint(f"refusing to load {where}: checkpoint metadata refused ({one_line(e)})",
                                    f"{self.metadata_name}: refused") from None
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise CorruptCheckpoint(f"refusing to load {where}: not DCP metadata (a {type(metadata).__name__})",
                                    f"{self.metadata_name}: not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_metadata(self) -> dcp_metadata.Metadata | None:  # no **kwargs: no fallback to per-rank metadata
        try:
            return self.load_metadata()
        except Exception as e:
            self.refusal = e
            return None

    def file_of(self, storage_index) -> str:
        """The data file holding one stored item (for error messages)."""
        info = self.storage_data.get(storage_index)
        return getattr(info, "relative_path", "?")


def _weights_only_cause(exc: Exception) -> str:
    """The line of torch.load's weights_only refusal that names what was refused (its first line does not)."""
    lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "Unsupported global" in line or "WeightsUnpickler error" in line]
    cause = named[0] if named else one_line(exc)
    return cause.split(" Please use")[0][:300]  # not its advice to allowlist what a crafted file names


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that non-tensor values are unpickled with torch.load(weights_only=True):
    plain containers, numbers, strings and tensors load; anything that would import or call code is refused
    (CorruptCheckpoint naming the entry and, given the `reader`, its file)."""

    def __init__(self, reader: SafeFsspecReader | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.reader = reader

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            where = self.reader.file_of(read_item.storage_index) if self.reader else "?"
            url = f"{self.reader.url}/{where}" if self.reader else where
            raise CorruptCheckpoint(f"refusing to load {url}: its value {fqn!r} is not plain data "
                                    f"({_weights_only_cause(e)})", f"{where}: value {fqn!r} refused") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


# --- the calls -------------------------------------------------------------------------------------------------

def _rank(group) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def _translated(exc: CheckpointException, action: str, url: str, rank: int, own: BaseException | None = None):
    """The one-line error for a CheckpointException: this rank's own failure first, else the lowest rank's."""
    if own is not None:
        return own
    failures = exc.failures
    r = rank if rank in failures else min(failures, default=None)
    if r is None:
        return CheckpointError(f"cannot {action} {url}: {one_line(exc)}")
    cause = failures[r][0] if isinstance(failures[r], tuple) else failures[r]
    if not isinstance(cause, Exception):  # KeyboardInterrupt, SystemExit on some rank: not ours to translate
        return exc
    if isinstance(cause, RunnerError):
        return cause
    if isinstance(cause, OSError) or (is_storage_exc(cause) and not isinstance(cause, (TypeError, ValueError))):
        try:
            with storage_errors(action, url):
                raise cause
        except RunnerError as e:
            return e
    return CheckpointError(f"cannot {action} {url}: rank {r}: {one_line(cause)}")


@contextlib.contextmanager
def _dcp_errors(action: str, url: str, group, own: Callable[[], BaseException | None] = lambda: None):
    """Run a DCP call: its CheckpointException (a BaseException) becomes one line; alone in its process (no
    process group), DCP's warning that it assumes so is silenced: that is the intent."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
            yield
    except CheckpointException as e:
        err = _translated(e, action, url, _rank(group), own())
        if err is e:
            raise
        raise err from None
    except RunnerError:
        raise
    except Exception:
        with storage_errors(action, url):  # a storage failure outside DCP's wrapping; anything else is a bug
            raise


def save_shards(store: CheckpointStore, step: int, attempt: str, state_dict: dict, group=None, *,
                files_per_rank: int = 1) -> dict[str, dict]:
    """Every rank (a collective): dcp.save `state_dict` (DTensors from FSDP2's get_state_dict, or plain tensors and
    plain values) into attempt `attempt` of checkpoint `step`. Returns the manifest entries of the files this
    rank wrote ({name: {"size", "sha256"}}; on rank 0 they include DCP's metadata). Nothing is committed: gather
    every rank's entries and call commit_shards on rank 0. The state dict is read while it is written, so a save
    that overlaps training must be given a copy."""
    path = attempt_dir(store, step, attempt)
    url = store._url(path.rsplit("/", 1)[-1])
    writer = HashingFsspecWriter(path, attempt, store.fs, files_per_rank=files_per_rank, sync_files=store.local)
    with _dcp_errors("write checkpoint", url, group):
        dcp.save(state_dict, storage_writer=writer, process_group=group)
    return dict(writer.files)


def write_file(store: CheckpointStore, step: int, attempt: str, name: str, payload: Payload) -> dict[str, dict]:
    """Write one small file (bytes, or a function that writes into a file, as in CheckpointStore.commit) into
    attempt `attempt` of checkpoint `step`, from any rank; returns its manifest entry as {name: entry}. On object
    stores it is stored under a fresh name (state.<attempt>.pt), recorded as the entry's "object"."""
    check_files({name: None})
    if _is_dcp_name(name):
        raise CheckpointError(f"invalid checkpoint file name {name!r}: shard-*.distcp and dcp-*.metadata are "
                              "DCP's names")
    path = attempt_dir(store, step, attempt)
    label = f"{store._url(_step_name(step))}/{name}"
    with storage_errors("write checkpoint", store._url(_step_name(step))):
        if store.local:
            size, sha = _write_synced(os.path.join(path, name), payload, label)
            return {name: {"size": size, "sha256": sha}}
        obj = fresh_object(name, attempt)
        size, sha = store._put(f"{path}/{obj}", payload, label)
        return {name: {"size": size, "sha256": sha, "object": obj}}


def commit_shards(store: CheckpointStore, step: int, attempt: str, entries: dict[str, dict], meta: dict) -> str:
    """Rank 0 only, once every rank's save_shards / write_file returned and their entries are merged into
    `entries`: write the manifest (`meta`, the files, and "sharded": {"metadata", "attempt"}) last and so commit
    checkpoint `step`; returns its URL. Locally the attempt directory gets the manifest, is fsynced and renamed
    into place (a previous commit of the step is moved aside, then deleted); on object stores one PUT of the
    manifest commits, then the step's objects it does not reference are deleted. Refuses, before writing,
    metadata that is not JSON and files that rank 0 cannot see with their recorded size."""
    name, url = _step_name(step), store._url(_step_name(step))
    path = _attempt_path(store, step, attempt)
    check_files(entries)
    meta_file = metadata_name(attempt)
    if meta_file not in entries:
        raise CheckpointError(f"cannot write {url}: the entries lack DCP's metadata {meta_file} (rank 0's "
                              "save_shards entries, for this attempt)")
    try:  # before anything is written
        manifest = store._manifest({**meta, SHARDED: {"metadata": meta_file, "attempt": attempt}}, step, entries)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot write {url}: checkpoint metadata is not JSON ({e})") from None
    try:
        with storage_errors("write checkpoint", url):
            store.fs.invalidate_cache(path)
            sizes = {p["name"].rstrip("/").rsplit("/", 1)[-1]: p["size"]
                     for p in store.fs.ls(path, detail=True) if p["type"] == "file"}
            if problem := size_problem({"files": entries}, sizes):
                raise CheckpointError(f"cannot write {url}: {problem} in {store._url(path.rsplit('/', 1)[-1])} "
                                      "(every rank must write to storage that rank 0 sees)")
            _test_pause()
            if store.local:
                store._install_local(path, name, manifest)
            else:
                store._publish_object(name, manifest, entries)
    finally:
        if store.local and os.path.lexists(path):  # not committed: leave nothing behind
            shutil.rmtree(path, ignore_errors=True)
    return url


def discard_attempt(store: CheckpointStore, step: int, attempt: str) -> None:
    """Rank 0, after a save_shards or write_file failed on some rank: remove what attempt `attempt` wrote (a
    committed checkpoint of the step, which references none of it, stays whole). Best left to cleanup_partial if
    this fails too."""
    path = _attempt_path(store, step, attempt)
    with storage_errors("clean up", store._url(path.rsplit("/", 1)[-1])):
        if store.local:
            shutil.rmtree(path, ignore_errors=True)
            return
        store.fs.invalidate_cache(path)
        try:
            found = store._relative_files(path)
        except FileNotFoundError:
            return
        ours = [f for f in found if f.startswith((f"shard-{attempt}-", f"dcp-{attempt}."))
                or f".{attempt}." in f or f.endswith(f".{attempt}")]
        for f in ours:
            store.fs.rm_file(f"{path}/{f}")


def sharded_metadata(info: CheckpointInfo) -> str | None:
    """The DCP metadata file of a sharded checkpoint's manifest; None for an ordinary checkpoint."""
    sharded = (info.manifest or {}).get(SHARDED)
    name = sharded.get("metadata") if isinstance(sharded, dict) else None
    return name if isinstance(name, str) else None


def _reader(store: CheckpointStore, info_or_url) -> tuple[CheckpointInfo, SafeFsspecReader]:
    info = info_or_url if isinstance(info_or_url, CheckpointInfo) and info_or_url.manifest else store.info(info_or_url)
    if not info.valid:
        raise CorruptCheckpoint(f"cannot load {info.url}: {info.reason}; resume from another checkpoint", info.reason)
    meta_file = sharded_metadata(info)
    if meta_file is None or meta_file not in info.manifest["files"]:
        raise CheckpointError(f"cannot load {info.url} as a sharded checkpoint: its manifest names no DCP metadata "
                              f"(it has: {', '.join(info.manifest['files'])})")
    name, _ = store._locate(info)
    return info, SafeFsspecReader(store._path(name), meta_file, store.fs, info.manifest["files"][meta_file], info.url)


def tensor_shapes(store: CheckpointStore, info_or_url) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor of a sharded checkpoint by its flattened name ("model.blocks.0.attn.qkv.weight",
    "optimizer.state.…"): its global shape and dtype, read from DCP's metadata alone (safely)."""
    _, reader = _reader(store, info_or_url)
    return {fqn: (tuple(md.size), md.properties.dtype)
            for fqn, md in reader.load_metadata().state_dict_metadata.items()
            if isinstance(md, dcp_metadata.TensorStorageMetadata)}


def read_full(store: CheckpointStore, info_or_url, section: str = "model") -> dict[str, torch.Tensor]:
    """The whole tensors of one section of a sharded checkpoint (its model state_dict by default), in this process
    and with no process group: for export, model.init_from and inspection, whatever world size wrote it. Holds
    the section in memory once."""
    prefix = section + "."
    target = {fqn[len(prefix):]: torch.empty(shape, dtype=dtype)
              for fqn, (shape, dtype) in tensor_shapes(store, info_or_url).items() if fqn.startswith(prefix)}
    if not target:
        raise CheckpointError(f"{getattr(info_or_url, 'url', info_or_url)} holds no '{section}' tensors")
    state = {section: target}
    load_shards(store, info_or_url, state)
    return state[section]


def load_shards(store: CheckpointStore, info_or_url, state_dict: dict, group=None) -> None:
    """Every rank (a collective), or a single process with no process group at all: dcp.load checkpoint
    `info_or_url` into `state_dict`, in place (its tensors, DTensors included, must have their final shapes and
    placements: e.g. get_state_dict of a freshly sharded model and optimizer; any world size). Loads only the keys
    `state_dict` has. Checks the manifest (cheaply: sizes) and DCP's metadata against its sha256, not the data
    files: call store.verify for that. Never runs code from the checkpoint."""
    info, reader = _reader(store, info_or_url)
    planner = SafeLoadPlanner(reader)
    with _dcp_errors("load checkpoint", info.url, group, lambda: reader.refusal):
        dcp.load(state_dict, storage_reader=reader, planner=planner, process_group=group)
