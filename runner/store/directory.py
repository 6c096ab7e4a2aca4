"""CheckpointStore: atomic commit, listing, verification, reading and retention of checkpoints.

This module knows bytes and fsspec URLs, not training. Layout:

    <store>/step-000001234/{MANIFEST.json, state.pt, ...}

A checkpoint exists iff its MANIFEST.json is well-formed and every file it lists matches in size and sha256
(what a well-formed manifest is: store/manifest.py). Local filesystems write into `<store>/.tmp-step-…-<hex>`
and `os.replace` it into place. Object stores (no rename) write each data object under a fresh physical name
(state.pt as state.<nonce>.pt, recorded as the file's "object" in the manifest), then the manifest in one PUT:
that PUT switches a re-committed step to the new objects, and only then are the old ones deleted, so a failed
rewrite leaves the old checkpoint whole. See docs/design.md, "Checkpoints and resume".

Storage failures surface as StorageError (permanent: fix the URL, permissions or credentials) or
StorageUnavailable (transient: retry later), classified in one place, `storage_fault` (store/faults.py);
reads and the probe retry transient failures, `retry_transient`.

Test hook: if the environment variable RUNNER_TEST_SLOW_COMMIT_S is set to a float, `commit`
sleeps that many seconds after the data files are written and before the manifest is written,
so chaos tests can land a kill inside a write.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import BinaryIO, NamedTuple

import fsspec

from runner.console import warn
from runner.errors import CheckpointError, CorruptCheckpoint, RunnerError, StorageError, one_line
from runner.store.faults import is_storage_exc, retry_transient, storage_errors
from runner.store.manifest import (MANIFEST, bytes_problem, check_files, fresh_object, parse_manifest, run_id_of, score,
                                   size_problem,
                                   stored_object, unreferenced)

SLOW_COMMIT_ENV = "RUNNER_TEST_SLOW_COMMIT_S"
STEP_RE = re.compile(r"step-([0-9]+)")  # ASCII digits only: int() would read "step-٦" as step 6
PROBE_PREFIX = ".probe-"
_TMP_PREFIX = ".tmp-"
_ASIDE_PREFIX = ".old-"  # a committed checkpoint moved aside while its step is re-committed (local dirs)
_CHUNK = 8 << 20  # verify streams files: a checkpoint may not fit in memory twice
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure",
           "abfss": "azure", "adl": "azure"}
_FSYNC_DIR_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})



@dataclass(frozen=True)
class CheckpointInfo:
    url: str  # full URL of the checkpoint directory
    step: int
    manifest: dict | None  # parsed, well-formed MANIFEST.json; None if missing, unreadable or malformed
    valid: bool
    reason: str  # "" when valid, else why not
    note: str = ""  # a flaw tolerated in a valid checkpoint, e.g. metrics that had to be ignored


class Upload(NamedTuple):
    """A multipart upload begun under a store and never completed or aborted (its writer was killed)."""
    key: str  # the object key it would create, in its bucket
    name: str  # that key relative to the store, e.g. step-000000008/state.<nonce>.pt
    upload_id: str
    parts: int
    size: int  # bytes of the parts uploaded so far: S3 keeps (and bills) them until the upload is aborted


def _step_name(step: int) -> str:
    return f"step-{step:09d}"



def _open_fs(url: str, storage_options: dict | None):
    """fsspec filesystem and root path for `url`; a missing backend says which extra to install."""
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as e:
        proto = fsspec.core.split_protocol(url)[0]
        extra = _EXTRAS.get(proto)
        hint = f"pip install 'runner-train[{extra}]'" if extra else f"install the fsspec backend for {proto}://"
        raise CheckpointError(f"cannot open {url}: storage backend missing ({e}); run: {hint}") from None
    except ValueError as e:  # fsspec's "Protocol not known"
        raise CheckpointError(
            f"cannot open {url}: {e}; use a local path or an fsspec URL such as s3://bucket/dir") from None


Payload = bytes | Callable[[BinaryIO], None]  # a file's bytes, or a function that writes them into a file
_LARGE_WRITE = 1 << 20  # writes this big (tensor records) are hashed on a second thread and start writeback


class HashingWriter:
    """A write-only file that sha256-hashes each chunk on a helper thread while this thread writes it out.
    sha256 and the write both release the GIL, so hashing adds no time when the disk is the slower of the two,
    and nothing holds the whole file in memory. `size` counts what was written."""

    def __init__(self, out, hasher: ThreadPoolExecutor):
        self.out, self.hasher, self.sha, self.size = out, hasher, hashlib.sha256(), 0
        self.error: BaseException | None = None  # what the storage raised, as opposed to the payload's writer

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        # smaller writes (pickle framing, headers) are hashed inline
        pending = self.hasher.submit(self.sha.update, view) if len(view) >= _LARGE_WRITE else None
        if pending is None:
            self.sha.update(view)
        try:
            rest = view
            while rest:  # raw files may take less than asked
                rest = rest[self.out.write(rest):]
        except BaseException as e:
            self.error = e
            raise
        finally:
            if pending is not None:
                pending.result()  # the caller may reuse its buffer once write returns
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        pass


def write_payload(out, payload: Payload, name: str) -> tuple[int, str]:
    """Write `payload` into the file object `out`; returns (size, sha256 hex). A writer function that fails
    on its own (not because the storage did) is a CheckpointError: retrying the write cannot help."""
    with ThreadPoolExecutor(1, thread_name_prefix="sha256") as hasher:
        writer = HashingWriter(out, hasher)
        if isinstance(payload, (bytes, bytearray, memoryview)):
            writer.write(payload)
            return writer.size, writer.sha.hexdigest()
        try:
            payload(writer)
        except Exception as e:
            if writer.error is not None:
                raise writer.error from None
            if isinstance(e, RunnerError):
                raise
            raise CheckpointError(f"cannot write {name}: {one_line(e)}") from e
    return writer.size, writer.sha.hexdigest()


class _EarlyWriteback:
    """A local file that starts each large write's trip to the disk at once: on Linux posix_fadvise(DONTNEED)
    starts writeback of the range without waiting for it, so the disk works while the rest is serialized and
    hashed, and the final fsync finds little left to write (measured: 0.59 s instead of 0.81 s for 600 MB)."""

    def __init__(self, f):
        self.f, self.offset = f, 0

    def write(self, data) -> int:
        n = self.f.write(data)
        if n >= _LARGE_WRITE and hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):  # a hint: a filesystem that refuses it still gets the data
                os.posix_fadvise(self.f.fileno(), self.offset, n, os.POSIX_FADV_DONTNEED)
        self.offset += n
        return n


def _write_synced(path: str, payload: Payload, label: str = "") -> tuple[int, str]:
    with open(path, "wb", buffering=0) as f:
        written = write_payload(_EarlyWriteback(f), payload, label or path)
        os.fsync(f.fileno())
    return written


def _fsync_dir(path: str) -> None:
    # Without this a crash can lose the directory entries even though the file data is on disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems (network, FUSE) cannot fsync a directory: the rename is as durable as they make it.
        if e.errno not in _FSYNC_DIR_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def _test_pause() -> None:
    if os.environ.get(SLOW_COMMIT_ENV):
        time.sleep(float(os.environ[SLOW_COMMIT_ENV]))


class CheckpointStore:
    """All checkpoints under one directory URL (local path, memory://, s3://, gs://, …)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.storage_options = dict(storage_options or {})
        self.fs, root = _open_fs(url, self.storage_options)
        self.root = root.rstrip("/") or "/"
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.local = bool({"file", "local"} & set(protocols))
        # Relative local paths become absolute so URLs stay valid if the working directory changes.
        self.url = self.root if self.local and "://" not in url else url.rstrip("/")
        self._uploading: set[str] = set()  # paths this store is writing now: its own uploads are not orphans

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def _url(self, name: str) -> str:
        return f"{self.url}/{name}"

    def probe(self) -> None:
        """Write, read back and delete a small object, so that a wrong URL, permission, credential or endpoint
        fails now, in one line, rather than at the first checkpoint. Transient failures are retried."""
        retry_transient(self._probe_once, f"probing {self.url}")

    def _probe_once(self) -> None:
        path = self._path(f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}")
        data = f"runner storage probe {path}".encode()
        with storage_errors("write, read back and delete a probe object in", self.url):
            if self.local:
                os.makedirs(self.root, exist_ok=True)
            try:
                self.fs.pipe_file(path, data)
                back = self.fs.cat_file(path)
            except Exception:
                with contextlib.suppress(Exception):  # best effort: the first error is the one to report
                    self.fs.rm_file(path)
                raise
            self.fs.rm_file(path)  # a store that cannot delete cannot prune either
        if back != data:
            raise StorageError(f"cannot use {self.url}: a probe object read back different bytes than were "
                               "written; check the storage endpoint")

    def commit(self, step: int, files: dict[str, Payload], meta: dict) -> str:
        """Atomically write checkpoint `step-{step:09d}` holding `files`; returns its URL. A file is given as
        bytes or as a function that writes it (streamed: hashed on the way, never held in memory whole)."""
        check_files(files)
        name, url = _step_name(step), self._url(_step_name(step))
        try:  # before anything is written
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"cannot write {url}: checkpoint metadata is not JSON ({e})") from None
        with storage_errors("write checkpoint", url):
            if self.local:
                self._commit_local(name, step, files, meta)
            else:
                self._commit_object(name, step, files, meta)
        return url

    @staticmethod
    def _manifest(meta: dict, step: int | None, entries: dict) -> bytes:
        manifest = {**meta, **({} if step is None else {"step": step}), "files": entries, "committed_at": time.time()}
        return json.dumps(manifest, indent=2, sort_keys=True).encode()

    def _commit_local(self, name: str, step: int | None, files: dict[str, Payload], meta: dict) -> None:
        # The temp dir is a sibling in the same directory, so os.replace is a same-filesystem rename.
        os.makedirs(self.root, exist_ok=True)
        tmp = self._path(f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex}")
        os.mkdir(tmp)
        try:
            entries = {}
            for fname, payload in files.items():
                size, sha = _write_synced(os.path.join(tmp, fname), payload, f"{self._url(name)}/{fname}")
                entries[fname] = {"size": size, "sha256": sha}
            _test_pause()
            self._install_local(tmp, name, self._manifest(meta, step, entries))
        finally:
            if os.path.lexists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)

    def _install_local(self, tmp: str, name: str, manifest: bytes) -> None:
        """The local commit point: write `manifest` into the fully written sibling directory `tmp`, fsync it and
        rename it into place as `name`. A committed version of `name` is moved aside first and deleted after
        (cleanup_partial puts it back if a kill lands between the two renames). Shared with store/sharded.py."""
        _write_synced(os.path.join(tmp, MANIFEST), manifest)
        _fsync_dir(tmp)
        final, aside = self._path(name), None
        if os.path.lexists(final):  # rename() cannot replace a non-empty directory: move it aside
            aside = self._path(f"{_ASIDE_PREFIX}{name}-{uuid.uuid4().hex}")  # cleanup_partial restores it
            os.replace(final, aside)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        if aside:
            self._delete(aside)

    def _commit_object(self, name: str, step: int | None, files: dict[str, Payload], meta: dict) -> None:
        base, nonce, entries = self._path(name), uuid.uuid4().hex[:12], {}
        for fname, payload in files.items():  # fresh names: the previous version of this step stays intact
            obj = fresh_object(fname, nonce)
            size, sha = self._put(f"{base}/{obj}", payload, f"{self._url(name)}/{fname}")
            entries[fname] = {"size": size, "sha256": sha, "object": obj}
        _test_pause()
        self._publish_object(name, self._manifest(meta, step, entries), entries)

    def _publish_object(self, name: str, manifest: bytes, entries: dict) -> None:
        """The object-store commit point: one PUT of `manifest` into step directory `name`, whose files (`entries`,
        as in the manifest) are all written; then the objects it does not reference (a replaced version of this
        step, a failed attempt's leftovers) are deleted. Shared with store/sharded.py."""
        base = self._path(name)
        # a single PUT: the commit point
        self.fs.pipe_file(f"{base}/{MANIFEST}", manifest)
        try:
            self.fs.invalidate_cache(base)
            referenced = {MANIFEST, *(stored_object(n, e) for n, e in entries.items())}
            for obj in sorted(set(self._relative_files(base)) - referenced):
                self.fs.rm_file(f"{base}/{obj}")
        except Exception as e:
            if not is_storage_exc(e):
                raise
            # Committed all the same: the stale objects cost space, and cleanup_partial removes them later.
            warn(f"committed {self._url(name)} but could not delete the objects it replaced "
                         f"({one_line(e)}); `cleanup_partial` removes them later")

    def _put(self, path: str, payload: Payload, label: str) -> tuple[int, str]:
        """Upload one object (multipart for large ones, by the fsspec backend); a failure aborts the upload
        instead of completing a partial object. A kill cannot abort it: cleanup_partial does, at the next start."""
        self._uploading.add(path)
        try:
            f = self.fs.open(path, "wb")
            try:
                written = write_payload(f, payload, label)
            except BaseException:
                with contextlib.suppress(Exception):
                    if hasattr(f, "discard"):  # fsspec's buffered files: abort the (multipart) upload
                        f.discard()
                        f.closed = True  # else its __del__ would try to finish the discarded upload
                    else:
                        f.close()
                raise
            f.close()
            return written
        finally:
            self._uploading.discard(path)

    def incomplete_uploads(self) -> list[Upload]:
        """S3 multipart uploads under this store that were neither completed nor aborted (a writer killed
        mid-upload), except this store's own in progress. S3 keeps their parts forever; other backends need no
        cleanup (GCS resumable sessions and Azure uncommitted blocks expire by themselves within a week)."""
        call = getattr(self.fs, "call_s3", None)  # s3fs only
        if call is None:
            return []
        bucket, key, _ = self.fs.split_path(self.root)
        prefix = f"{key.strip('/')}/" if key.strip("/") else ""
        own = {self.fs.split_path(p)[1] for p in self._uploading}
        found, more = [], {}
        while True:
            page = call("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **more)
            for up in page.get("Uploads", []):
                if up["Key"] not in own:
                    parts = call("list_parts", Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"]).get("Parts", [])
                    found.append(Upload(up["Key"], up["Key"][len(prefix):], up["UploadId"], len(parts),
                                        sum(p["Size"] for p in parts)))
            if not page.get("IsTruncated"):
                return found
            more = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    def _relative_files(self, base: str) -> list[str]:
        return [p[len(base) + 1:] for p in self.fs.find(base)]

    def _delete(self, path: str) -> None:
        """Manifest first, then the data, so a half-deleted checkpoint never looks valid."""
        for target, recursive in ((f"{path}/{MANIFEST}", False), (path, True)):
            try:
                self.fs.rm(target, recursive=recursive)
            except FileNotFoundError:
                pass

    def _scan(self) -> dict[str, dict[str, int]]:
        """One recursive listing: {entry directly under the store: {file name: size}}."""
        self.fs.invalidate_cache()  # another process may have written since our last look
        try:
            found = self.fs.find(self.root, withdirs=True, detail=True)
        except FileNotFoundError:
            return {}
        prefix, dirs = self.root.rstrip("/") + "/", {}
        for path, entry in found.items():
            if not path.startswith(prefix):
                continue
            top, _, rest = path[len(prefix):].partition("/")
            if rest or entry["type"] == "directory":
                files = dirs.setdefault(top, {})
                if rest and entry["type"] == "file":
                    files[rest] = entry["size"]
        return dirs

    def _load_manifest(self, name: str, step: int | None) -> tuple[dict | None, str, str]:
        try:
            blob = self.fs.cat_file(f"{self._path(name)}/{MANIFEST}")
        except FileNotFoundError:
            return None, "manifest missing", ""
        return parse_manifest(blob, step)

    def _cheap_info(self, name: str, step: int, sizes: dict[str, int]) -> CheckpointInfo:
        manifest, reason, note = None, "manifest missing", ""
        if MANIFEST in sizes:  # saves a request per manifest-less directory
            manifest, reason, note = self._load_manifest(name, step)
        if not reason:
            reason = size_problem(manifest, sizes)
        return CheckpointInfo(self._url(name), step, manifest, not reason, reason, note)

    def list(self) -> list[CheckpointInfo]:
        """Every step-* directory, ascending step; validity by manifest and file sizes (no hashing)."""
        with storage_errors("list checkpoints under", self.url):
            infos = [self._cheap_info(name, int(m.group(1)), sizes)
                     for name, sizes in self._scan().items() if (m := STEP_RE.fullmatch(name))]
        return sorted(infos, key=lambda i: i.step)

    def _locate(self, info_or_url) -> tuple[str, int]:
        """Name and step of a checkpoint directory of this store, from a CheckpointInfo or URL."""
        url = (info_or_url.url if isinstance(info_or_url, CheckpointInfo) else str(info_or_url)).rstrip("/")
        path = self.fs._strip_protocol(url).rstrip("/")
        parent, _, name = path.rpartition("/")
        m = STEP_RE.fullmatch(name)
        if not m or (parent or "/") != self.root:
            raise CheckpointError(f"{url} is not a checkpoint directory of {self.url} "
                                  f"(expected {self.url}/step-NNNNNNNNN)")
        return name, int(m.group(1))

    def info(self, info_or_url) -> CheckpointInfo:
        """Cheap check of one checkpoint (manifest and sizes, no hashing)."""
        name, step = self._locate(info_or_url)
        self.fs.invalidate_cache()
        with storage_errors("read checkpoint", self._url(name)):
            try:
                entries = self.fs.ls(self._path(name), detail=True)
            except FileNotFoundError:
                return CheckpointInfo(self._url(name), step, None, False, "directory missing")
            sizes = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e["size"]
                     for e in entries if e["type"] == "file"}
            return self._cheap_info(name, step, sizes)

    def _sha256(self, path: str) -> str:
        digest = hashlib.sha256()
        with self.fs.open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def verify(self, info_or_url, skip: str | None = None) -> CheckpointInfo:
        """Full check: sizes and sha256 of every file listed in the manifest (but `skip`, checked as it is read)."""
        info = self.info(info_or_url)
        if not info.valid:
            return info
        name, _ = self._locate(info)
        with storage_errors("verify checkpoint", info.url):
            for fname, entry in sorted(info.manifest["files"].items()):
                if fname == skip:
                    continue
                try:
                    ok = self._sha256(f"{self._path(name)}/{stored_object(fname, entry)}") == entry["sha256"]
                except FileNotFoundError:
                    return replace(info, valid=False, reason=f"{fname}: missing")
                if not ok:
                    return replace(info, valid=False, reason=f"{fname}: sha256 mismatch")
        return info

    def latest_valid(self, warn=warn) -> CheckpointInfo | None:
        """Highest step that fully verifies; each newer one skipped is reported through `warn`."""
        for info in reversed(self.list()):
            if info.valid:
                info = self.verify(info)
            if info.valid:
                return info
            warn(f"skipping checkpoint {info.url}: {info.reason}; falling back to an earlier one")
        return None

    def read_latest(self, name: str = "state.pt", warn=warn) -> tuple[CheckpointInfo, bytes] | None:
        """The newest checkpoint whose `name` matches its manifest, with those bytes. Reading is the check, so
        a large checkpoint is downloaded once, not once to verify and again to load. Only an invalid or corrupt
        checkpoint is skipped for an older one: a transient storage error is retried and then raised
        (StorageUnavailable), so that a network blip never rolls a run back to an older checkpoint."""
        for info in reversed(retry_transient(self.list, f"listing {self.url}")):
            reason = info.reason
            if info.valid and name not in info.manifest["files"]:
                reason = f"{name}: not in its manifest"
            elif info.valid:
                try:
                    data = retry_transient(functools.partial(self.read, info, name), f"reading {info.url}/{name}")
                except CorruptCheckpoint as e:
                    reason = e.reason
                else:  # a sharded checkpoint's shards are verified too, before it is chosen
                    checked = (retry_transient(functools.partial(self.verify, info, skip=name), f"verifying {info.url}")
                               if "sharded" in info.manifest else info)
                    if checked.valid:
                        return info, data
                    reason = checked.reason
            warn(f"skipping checkpoint {info.url}: {reason}; falling back to an earlier one")
        return None

    def read(self, info_or_url, name: str = "state.pt") -> bytes:
        """The bytes of one file, checked against the manifest's size and sha256 (a single read). Raises
        CorruptCheckpoint if they do not match, StorageError / StorageUnavailable if storage fails."""
        dname, step = self._locate(info_or_url)
        return self._read_verified(dname, step, name)[1]

    def _read_verified(self, dname: str, step: int | None, name: str) -> tuple[dict, bytes]:
        url = f"{self._url(dname)}/{name}"
        with storage_errors("read", url):
            manifest, reason, _ = self._load_manifest(dname, step)
            if reason:
                raise CorruptCheckpoint(f"cannot read {url}: {reason}; resume from another checkpoint", reason)
            entry = manifest["files"].get(name)
            if entry is None:
                has = ", ".join(manifest["files"])
                raise CheckpointError(f"cannot read {url}: not in its manifest (it has: {has})")
            try:
                data = self.fs.cat_file(f"{self._path(dname)}/{stored_object(name, entry)}")
            except FileNotFoundError:
                raise CorruptCheckpoint(f"cannot read {url}: file missing; resume from another checkpoint",
                                        f"{name}: missing") from None
        if reason := bytes_problem(name, data, entry):
            raise CorruptCheckpoint(f"{url} is corrupt ({reason}); delete it or resume from an earlier checkpoint",
                                    reason)
        return manifest, data

    # --- side directories: beside the checkpoints, never one of them -------------------------------------------

    def commit_side(self, name: str, files: dict[str, Payload], meta: dict) -> str:
        """Atomically write `<store>/<name>/` under a checkpoint's commit rule and manifest (no step): listing,
        retention, resume and cleanup never take it for a checkpoint. Runner keeps its compile cache so."""
        if STEP_RE.fullmatch(name) or name.startswith(".") or "/" in name:
            raise ValueError(f"{name!r} is not a side directory name")
        check_files(files)
        with storage_errors("write", self._url(name)):
            (self._commit_local if self.local else self._commit_object)(name, None, files, meta)
        return self._url(name)

    def read_side(self, name: str, fname: str) -> tuple[dict, bytes] | None:
        """(manifest, bytes of `fname`) of side directory `name`, checked like a checkpoint's file; None when it
        was never written. Raises CorruptCheckpoint when it does not match its manifest."""
        with storage_errors("read", self._url(name)):
            self.fs.invalidate_cache()
            if not self.fs.exists(f"{self._path(name)}/{MANIFEST}"):
                return None
        return self._read_verified(name, None, fname)

    def prune(self, keep_last: int, keep_best: int = 0, metric: str | None = None, mode: str = "min", *,
              run_id: str | None = None) -> list[str]:
        """Delete all but the last `keep_last` and best `keep_best` valid checkpoints; returns their URLs.

        keep_last <= 0 keeps everything. Invalid checkpoints newer than the newest valid one are left
        alone: on an object store that may be a write still in progress (cleanup_partial handles them).
        A metric that is missing, not a number, NaN or infinite never ranks as best. With `run_id`, only
        that run's checkpoints (manifest "run_id"; none: LEGACY_RUN_ID) are considered or deleted; a checkpoint
        without a readable manifest belongs to no run: it is not deleted.
        """
        if mode not in ("min", "max") or (keep_best > 0 and not metric):
            raise CheckpointError(f"bad retention for {self.url}: need mode 'min' or 'max' and a metric "
                                  f"name when keep_best > 0 (got mode={mode!r}, metric={metric!r})")
        if keep_last <= 0:
            return []
        infos = self.list()
        if run_id is not None:
            infos = [i for i in infos if i.manifest and run_id_of(i.manifest) == run_id]
        valid = [i for i in infos if i.valid]
        if not valid:
            return []
        keep = {i.step for i in valid[-keep_last:]}
        keep |= {i.step for i in best_first(valid, metric, mode)[:max(keep_best, 0)]} if keep_best > 0 else set()
        doomed = [i for i in infos if i.step not in keep and i.step < valid[-1].step]
        with storage_errors("delete checkpoints under", self.url):
            for info in doomed:
                self._delete(self._path(info.url.rsplit("/", 1)[-1]))
        return [i.url for i in doomed]

    def cleanup_partial(self) -> list[str]:
        """Remove leftovers of interrupted writes: .tmp-* dirs, step dirs with no MANIFEST.json, objects in a
        valid step dir that its manifest does not reference (a failed rewrite) and incomplete S3 multipart
        uploads (a writer killed mid-upload). Returns their URLs.

        Call it only when no other process is writing to this store (e.g. at start-up, on rank 0, holding the
        lease: every upload begun before is then an orphan or a fenced-out writer's).
        """
        removed = []
        with storage_errors("clean up", self.url):
            scanned = self._scan()
            for name, sizes in sorted(scanned.items()):
                m = STEP_RE.fullmatch(name)
                if name.startswith(_ASIDE_PREFIX):  # a re-commit killed between its two renames
                    original = name[len(_ASIDE_PREFIX):].rsplit("-", 1)[0]
                    if original not in scanned and STEP_RE.fullmatch(original):
                        os.replace(self._path(name), self._path(original))  # the committed version comes back
                        continue
                if name.startswith((_TMP_PREFIX, _ASIDE_PREFIX)) or (m and MANIFEST not in sizes):
                    self._delete(self._path(name))
                    removed.append(self._url(name))
                elif m and (info := self._cheap_info(name, int(m.group(1)), sizes)).valid:
                    for obj in unreferenced(info.manifest, sizes):
                        self.fs.rm_file(f"{self._path(name)}/{obj}")
                        removed.append(f"{self._url(name)}/{obj}")
            try:
                for up in self.incomplete_uploads():
                    self.fs.call_s3("abort_multipart_upload", Bucket=self.fs.split_path(self.root)[0], Key=up.key,
                                    UploadId=up.upload_id)
                    removed.append(self._url(up.name))
            except Exception as e:
                if not is_storage_exc(e):
                    raise
                # They cost space, not correctness: a store that refuses to list them must not stop the run.
                warn(f"could not abort the incomplete uploads under {self.url} ({one_line(e)}); S3 keeps "
                             "their parts until they are aborted (a lifecycle rule AbortIncompleteMultipartUpload)")
        return removed


def best_first(infos: list[CheckpointInfo], metric: str | None, mode: str = "min") -> list[CheckpointInfo]:
    """The valid checkpoints with a finite `metric`, best first; of tied ones the newer first (it trained longer).
    The one ranking: retention keeps the head of this list, `ckpt ls` and `export --checkpoint best` name its first."""
    scored = [i for i in infos if i.valid and score(i.manifest, metric) is not None]
    sign = 1 if mode == "min" else -1
    return sorted(scored, key=lambda i: (sign * score(i.manifest, metric), -i.step))


def open_checkpoint(url: str, storage_options: dict | None = None) -> tuple[CheckpointStore, CheckpointInfo]:
    """The store holding the step-* directory `url`, and that checkpoint's (cheap) info."""
    url = url.rstrip("/")
    parent, _, name = url.rpartition("/")
    if not STEP_RE.fullmatch(name):
        raise CheckpointError(f"{url} does not name a checkpoint directory (expected .../step-NNNNNNNNN)")
    store = CheckpointStore(parent or ".", storage_options)
    info = store.info(url if parent else store._url(name))
    if info.reason == "directory missing":
        raise CheckpointError(f"no checkpoint at {url}; list them with `runner ckpt ls <dir>`")
    return store, info
