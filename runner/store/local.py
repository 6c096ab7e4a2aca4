"""The node-local tier (checkpoint.local_dir): each checkpoint committed first to a folder on this machine
(/dev/shm, a local NVMe), under the same commit rule and manifest as the durable store's, then copied from there
byte for byte to the durable store (every checkpoint, or every k-th). docs/design.md, "The node-local tier".

One folder per durable store, `<local_dir>/<sha1 of its URL>`, so jobs sharing /dev/shm never see each other's
copies. A local copy is a candidate for resume only as a copy of the durable store's lineage (its manifest's run
id is the durable store's newest), and never outlives its run: copies of another lineage are removed at start,
and the whole folder when the run finishes.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from runner.console import warn
from runner.store.directory import CheckpointInfo, CheckpointStore, Payload
from runner.store.manifest import bytes_problem, run_id_of, stored_object

KEEP = 2  # local copies kept: the newest, and the one before it while the newest is written


class LocalTier:
    def __init__(self, local_dir: str, durable_url: str):
        self.root = Path(local_dir) / hashlib.sha1(durable_url.encode()).hexdigest()[:16]
        self.store = CheckpointStore(str(self.root))
        self.url = self.store.url

    def commit(self, step: int, payload: Payload, meta: dict) -> str:
        url = self.store.commit(step, {"state.pt": payload}, meta)
        self.store.prune(KEEP, run_id=meta.get("run_id"))
        return url

    def copy(self, step: int) -> Payload:
        """The committed local state.pt of `step`, streamed into another store's file: the same bytes."""
        path = self.root / f"step-{step:09d}" / "state.pt"

        def write(out) -> None:
            with open(path, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
        return write

    def copy_of(self, url: str, manifest: dict) -> bytes | None:
        """This machine's copy of the local checkpoint `url` that rank 0 chose (the same step directory under this
        rank's own local_dir), if its state.pt is the one `manifest` lists; None: it must come from rank 0."""
        entry = manifest["files"]["state.pt"]
        try:
            data = (self.root / url.rstrip("/").rsplit("/", 1)[-1] / stored_object("state.pt", entry)).read_bytes()
        except OSError:  # a new VM, or a node rank 0 never ran on
            return None
        return None if bytes_problem("state.pt", data, entry) else data

    def latest(self, durable: CheckpointInfo | None) -> tuple[CheckpointInfo, bytes] | None:
        """The newest local copy that verifies, of the durable newest's lineage and at least as new; None: use
        the durable store. A copy that does not verify is skipped with one warning (read_latest's)."""
        if durable is None or not self.root.is_dir():
            return None
        found = self.store.read_latest(warn=warn)
        if found is None:
            return None
        info, data = found
        if run_id_of(info.manifest) != run_id_of(durable.manifest) or info.step < durable.step:
            return None
        return info, data

    def keep_only(self, run_id: str) -> None:
        """Remove the copies of any other lineage (a new run in the same checkpoint.dir, an older one's leftovers)."""
        for info in self.store.list():
            if info.manifest is None or run_id_of(info.manifest) != run_id:
                shutil.rmtree(self.root / info.url.rsplit("/", 1)[-1], ignore_errors=True)
        for url in self.store.cleanup_partial():
            warn(f"removed incomplete local checkpoint write {url}")

    def forget(self) -> None:
        """The run is finished: its durable checkpoint is the one that counts."""
        shutil.rmtree(self.root, ignore_errors=True)
