"""CheckpointStore: atomic commit, listing, verification, reading and retention of checkpoints.

This module knows bytes and fsspec URLs, not training. Layout (see DESIGN.md, "Checkpoint format"):

    <store>/step-000001234/{state.pt, ..., MANIFEST.json}

A checkpoint exists iff its MANIFEST.json exists and every file it lists matches in size and sha256.
Local filesystems write into `<store>/.tmp-step-…-<hex>` and `os.replace` it into place; object
stores (no rename) write the data objects first and the manifest last, one PUT each.

Test hook: if the environment variable RUNNER_TEST_SLOW_COMMIT_S is set to a float, `commit`
sleeps that many seconds after the data files are written and before the manifest is written,
so chaos tests can land a kill inside a write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import fsspec

from runner.errors import CheckpointError

MANIFEST = "MANIFEST.json"
SLOW_COMMIT_ENV = "RUNNER_TEST_SLOW_COMMIT_S"
_STEP_RE = re.compile(r"step-(\d+)")
_TMP_PREFIX = ".tmp-"
_CHUNK = 8 << 20  # verify streams files: a checkpoint may not fit in memory twice
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure",
           "abfss": "azure", "adl": "azure"}


@dataclass(frozen=True)
class CheckpointInfo:
    url: str  # full URL of the checkpoint directory
    step: int
    manifest: dict | None  # parsed MANIFEST.json, None if missing or unreadable
    valid: bool
    reason: str  # "" when valid, else why not


def _warn_stderr(msg: str) -> None:
    print(f"runner: warning: {msg}", file=sys.stderr)


def _step_name(step: int) -> str:
    return f"step-{step:09d}"


def _open_fs(url: str, storage_options: dict | None):
    """fsspec filesystem and root path for `url`; a missing backend says which extra to install."""
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as e:
        proto = fsspec.core.split_protocol(url)[0]
        extra = _EXTRAS.get(proto)
        hint = f"pip install 'runner[{extra}]'" if extra else f"install the fsspec backend for {proto}://"
        raise CheckpointError(f"cannot open {url}: storage backend missing ({e}); run: {hint}") from None
    except ValueError as e:  # fsspec's "Protocol not known"
        raise CheckpointError(
            f"cannot open {url}: {e}; use a local path or an fsspec URL such as s3://bucket/dir") from None


@contextlib.contextmanager
def _io(action: str, url: str):
    """Turn storage failures into one-line CheckpointErrors that name the URL."""
    try:
        yield
    except CheckpointError:
        raise
    except OSError as e:
        detail = " ".join(f"{type(e).__name__}: {e}".split())
        raise CheckpointError(
            f"cannot {action} {url}: {detail}; check the path, permissions and storage credentials") from e


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    # Without this a crash can lose the directory entries even though the file data is on disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _test_pause() -> None:
    if os.environ.get(SLOW_COMMIT_ENV):
        time.sleep(float(os.environ[SLOW_COMMIT_ENV]))


def _check_files(files: dict) -> None:
    for name in files:
        if not name or "/" in name or name.startswith(".") or name == MANIFEST:
            raise CheckpointError(f"invalid checkpoint file name {name!r}: use a plain name such as state.pt")


def _parse_manifest(blob: bytes) -> tuple[dict | None, str]:
    try:
        manifest = json.loads(blob)
    except ValueError as e:
        return None, f"manifest unreadable: {e}"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
            for e in files.values()):
        return (manifest if isinstance(manifest, dict) else None), "manifest malformed: bad 'files' table"
    return manifest, ""


def _size_problem(manifest: dict, step: int, sizes: dict[str, int]) -> str:
    """Cheap validity check: the step matches the directory and every file has its recorded size."""
    if manifest.get("step", step) != step:
        return f"manifest step {manifest.get('step')} != directory step {step}"
    for name, entry in sorted(manifest["files"].items()):
        if name not in sizes:
            return f"{name}: missing"
        if sizes[name] != entry["size"]:
            return f"{name}: size {sizes[name]} != {entry['size']}"
    return ""


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

    def _path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def _url(self, name: str) -> str:
        return f"{self.url}/{name}"

    def commit(self, step: int, files: dict[str, bytes], meta: dict) -> str:
        """Atomically write checkpoint `step-{step:09d}` holding `files`; returns its URL."""
        _check_files(files)
        name, url = _step_name(step), self._url(_step_name(step))
        # Hash the bytes as given: one pass in memory, never re-read what we just wrote.
        entries = {n: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in files.items()}
        manifest = {**meta, "step": step, "files": entries, "committed_at": time.time()}
        try:
            blob = json.dumps(manifest, indent=2, sort_keys=True).encode()
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"cannot write {url}: checkpoint metadata is not JSON ({e})") from None
        with _io("write checkpoint", url):
            if self.local:
                self._commit_local(name, files, blob)
            else:
                self._commit_object(name, files, blob)
        return url

    def _commit_local(self, name: str, files: dict[str, bytes], blob: bytes) -> None:
        # The temp dir is a sibling in the same directory, so os.replace is a same-filesystem rename.
        os.makedirs(self.root, exist_ok=True)
        tmp = self._path(f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex}")
        os.mkdir(tmp)
        try:
            for fname, data in files.items():
                _write_synced(os.path.join(tmp, fname), data)
            _test_pause()
            _write_synced(os.path.join(tmp, MANIFEST), blob)
            _fsync_dir(tmp)
            final, aside = self._path(name), None
            if os.path.lexists(final):  # rename() cannot replace a non-empty directory: move it aside
                aside = self._path(f"{_TMP_PREFIX}old-{name}-{uuid.uuid4().hex}")
                os.replace(final, aside)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            if aside:
                self._delete(aside)
        finally:
            if os.path.lexists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)

    def _commit_object(self, name: str, files: dict[str, bytes], blob: bytes) -> None:
        base = self._path(name)
        if self.fs.exists(base):  # a leftover or an older write of the same step
            self._delete(base)
        for fname, data in files.items():
            self.fs.pipe_file(f"{base}/{fname}", data)
        _test_pause()
        self.fs.pipe_file(f"{base}/{MANIFEST}", blob)  # a single PUT: the commit point

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

    def _load_manifest(self, path: str) -> tuple[dict | None, str]:
        try:
            blob = self.fs.cat_file(f"{path}/{MANIFEST}")
        except FileNotFoundError:
            return None, "manifest missing"
        return _parse_manifest(blob)

    def _cheap_info(self, name: str, step: int, sizes: dict[str, int]) -> CheckpointInfo:
        manifest, reason = (None, "manifest missing")
        if MANIFEST in sizes:  # saves a request per manifest-less directory
            manifest, reason = self._load_manifest(self._path(name))
        if not reason:
            reason = _size_problem(manifest, step, sizes)
        return CheckpointInfo(self._url(name), step, manifest, not reason, reason)

    def list(self) -> list[CheckpointInfo]:
        """Every step-* directory, ascending step; validity by manifest and file sizes (no hashing)."""
        with _io("list checkpoints under", self.url):
            infos = [self._cheap_info(name, int(m.group(1)), sizes)
                     for name, sizes in self._scan().items() if (m := _STEP_RE.fullmatch(name))]
        return sorted(infos, key=lambda i: i.step)

    def _locate(self, info_or_url) -> tuple[str, int]:
        """Name and step of a checkpoint directory of this store, from a CheckpointInfo or URL."""
        url = (info_or_url.url if isinstance(info_or_url, CheckpointInfo) else str(info_or_url)).rstrip("/")
        path = self.fs._strip_protocol(url).rstrip("/")
        parent, _, name = path.rpartition("/")
        m = _STEP_RE.fullmatch(name)
        if not m or (parent or "/") != self.root:
            raise CheckpointError(f"{url} is not a checkpoint directory of {self.url} "
                                  f"(expected {self.url}/step-NNNNNNNNN)")
        return name, int(m.group(1))

    def info(self, info_or_url) -> CheckpointInfo:
        """Cheap check of one checkpoint (manifest and sizes, no hashing)."""
        name, step = self._locate(info_or_url)
        self.fs.invalidate_cache()
        with _io("read checkpoint", self._url(name)):
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

    def verify(self, info_or_url) -> CheckpointInfo:
        """Full check: sizes and sha256 of every file listed in the manifest."""
        info = self.info(info_or_url)
        if not info.valid:
            return info
        name, _ = self._locate(info)
        with _io("verify checkpoint", info.url):
            for fname, entry in sorted(info.manifest["files"].items()):
                try:
                    ok = self._sha256(f"{self._path(name)}/{fname}") == entry["sha256"]
                except FileNotFoundError:
                    return replace(info, valid=False, reason=f"{fname}: missing")
                if not ok:
                    return replace(info, valid=False, reason=f"{fname}: sha256 mismatch")
        return info

    def latest_valid(self, warn=_warn_stderr) -> CheckpointInfo | None:
        """Highest step that fully verifies; each newer one skipped is reported through `warn`."""
        for info in reversed(self.list()):
            if info.valid:
                info = self.verify(info)
            if info.valid:
                return info
            warn(f"skipping checkpoint {info.url}: {info.reason}; falling back to an earlier one")
        return None

    def read_latest(self, name: str = "state.pt", warn=_warn_stderr) -> tuple[CheckpointInfo, bytes] | None:
        """The newest checkpoint whose `name` matches its manifest, with those bytes. Reading is the check, so
        a large checkpoint is downloaded once, not once to verify and again to load."""
        for info in reversed(self.list()):
            reason = info.reason
            if info.valid:
                try:
                    return info, self.read(info, name)
                except CheckpointError as e:
                    reason = self.verify(info).reason or str(e)  # the precise reason, e.g. which file
            warn(f"skipping checkpoint {info.url}: {reason}; falling back to an earlier one")
        return None

    def read(self, info_or_url, name: str = "state.pt") -> bytes:
        """The bytes of one file, checked against the manifest's size and sha256 (a single read)."""
        dname, _ = self._locate(info_or_url)
        url = f"{self._url(dname)}/{name}"
        with _io("read", url):
            manifest, reason = self._load_manifest(self._path(dname))
            if reason:
                raise CheckpointError(f"cannot read {url}: {reason}; resume from another checkpoint")
            entry = manifest["files"].get(name)
            if entry is None:
                has = ", ".join(manifest["files"])
                raise CheckpointError(f"cannot read {url}: not in its manifest (it has: {has})")
            try:
                data = self.fs.cat_file(f"{self._path(dname)}/{name}")
            except FileNotFoundError:
                msg = f"cannot read {url}: file missing; resume from another checkpoint"
                raise CheckpointError(msg) from None
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"{url} is corrupt (size or sha256 differs from its manifest); "
                                  "delete it or resume from an earlier checkpoint")
        return data

    def prune(self, keep_last: int, keep_best: int = 0, metric: str | None = None,
              mode: str = "min") -> list[str]:
        """Delete all but the last `keep_last` and best `keep_best` valid checkpoints; returns their URLs.

        keep_last <= 0 keeps everything. Invalid checkpoints newer than the newest valid one are left
        alone: on an object store that may be a write still in progress (cleanup_partial handles them).
        """
        if mode not in ("min", "max") or (keep_best > 0 and not metric):
            raise CheckpointError(f"bad retention for {self.url}: need mode 'min' or 'max' and a metric "
                                  f"name when keep_best > 0 (got mode={mode!r}, metric={metric!r})")
        if keep_last <= 0:
            return []
        infos = self.list()
        valid = [i for i in infos if i.valid]
        if not valid:
            return []
        keep = {i.step for i in valid[-keep_last:]}
        scored = [i for i in valid if isinstance((i.manifest.get("metrics") or {}).get(metric), (int, float))]
        scored.sort(key=lambda i: i.manifest["metrics"][metric], reverse=(mode == "max"))
        keep |= {i.step for i in scored[:max(keep_best, 0)]}
        doomed = [i for i in infos if i.step not in keep and i.step < valid[-1].step]
        with _io("delete checkpoints under", self.url):
            for info in doomed:
                self._delete(self._path(info.url.rsplit("/", 1)[-1]))
        return [i.url for i in doomed]

    def cleanup_partial(self) -> list[str]:
        """Remove leftovers of interrupted writes: .tmp-* dirs and step dirs with no MANIFEST.json.

        Call it only when no other process is writing to this store (e.g. at start-up, on rank 0).
        """
        removed = []
        with _io("clean up", self.url):
            for name, sizes in sorted(self._scan().items()):
                if name.startswith(_TMP_PREFIX) or (_STEP_RE.fullmatch(name) and MANIFEST not in sizes):
                    self._delete(self._path(name))
                    removed.append(self._url(name))
        return removed


def _human(n: int) -> str:
    unit = next(u for u in range(4) if n < 1024 ** (u + 1) or u == 3)
    return f"{n} B" if unit == 0 else f"{n / 1024 ** unit:.1f} {('KiB', 'MiB', 'GiB')[unit - 1]}"


def _row(info: CheckpointInfo) -> list[str]:
    # Tolerant of odd manifests: the listing is how a user finds out what is wrong with them.
    m = info.manifest or {}
    t = m.get("committed_at")
    when = datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if isinstance(
        t, (int, float)) else "-"
    files = m.get("files") if isinstance(m.get("files"), dict) else {}
    size = _human(sum(e.get("size", 0) for e in files.values() if isinstance(e, dict))) if files else "-"
    metrics = m.get("metrics") if isinstance(m.get("metrics"), dict) else {}
    shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in sorted(metrics.items())) or "-"
    status = "valid" if info.valid else f"INVALID: {info.reason}"
    return [str(info.step), str(m.get("epoch", "-")), when, size, shown, status]


def _table(infos: list[CheckpointInfo]) -> str:
    rows = [["step", "epoch", "time (UTC)", "size", "metrics", "status"]] + [_row(i) for i in infos]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1] for r in rows)


def describe_listing(store: CheckpointStore) -> str:
    """A table of every checkpoint in `store` (cheap check, no hashing)."""
    infos = store.list()
    return _table(infos) if infos else f"no checkpoints under {store.url}"


def open_checkpoint(url: str, storage_options: dict | None = None) -> tuple[CheckpointStore, CheckpointInfo]:
    """The store holding the step-* directory `url`, and that checkpoint's (cheap) info."""
    url = url.rstrip("/")
    parent, _, name = url.rpartition("/")
    if not _STEP_RE.fullmatch(name):
        raise CheckpointError(f"{url} does not name a checkpoint directory (expected .../step-NNNNNNNNN)")
    store = CheckpointStore(parent or ".", storage_options)
    info = store.info(url if parent else store._url(name))
    if info.reason == "directory missing":
        raise CheckpointError(f"no checkpoint at {url}; list them with `runner ckpt list <dir>`")
    return store, info


def run_verify(url: str, storage_options: dict | None = None) -> tuple[str, int]:
    """Fully verify one checkpoint (URL names step-*) or every checkpoint of a store; (text, exit code)."""
    if _STEP_RE.fullmatch(url.rstrip("/").rpartition("/")[2]):
        store, info = open_checkpoint(url, storage_options)
        infos = [store.verify(info)]
    else:
        store = CheckpointStore(url, storage_options)
        infos = [store.verify(i) for i in store.list()]
        if not infos:
            return f"no checkpoints under {store.url}", 1
    bad = sum(not i.valid for i in infos)
    summary = f"{len(infos)} checkpoint(s) verified, {bad} invalid"
    return _table(infos) + "\n" + summary, 1 if bad else 0
