"""The storage layer: checkpoints as bytes on any fsspec URL, with their commit rule, manifests, lease and faults.

It knows bytes and URLs, not training: nothing here imports runner beyond `errors` and `console`
(tests/test_structure.py holds it to that). The rest of runner uses the names below.
"""
from runner.store.directory import STEP_RE, CheckpointInfo, CheckpointStore, best_first, open_checkpoint
from runner.store.faults import RETRY_ATTEMPTS, RETRY_BACKOFF_S, retry_transient, storage_errors, storage_fault
from runner.store.lease import LEASE, Lease, LeaseHeld, StoppedWaiting
from runner.store.local import LocalTier
from runner.store.manifest import LEGACY_RUN_ID, MANIFEST, bytes_problem, run_id_of, score

# Sharded (DCP) checkpoints, store/sharded.py: imported on first use, since torch.distributed.checkpoint takes
# seconds to import and most users of the store (`runner ckpt ls`) never need it.
_SHARDED = ("HashingFsspecWriter", "SafeFsspecReader", "SafeLoadPlanner", "attempt_dir", "commit_shards",
            "discard_attempt", "load_shards", "metadata_name", "new_attempt", "read_full", "save_shards",
            "sharded_metadata", "tensor_shapes", "write_file")


def __getattr__(name: str):
    if name in _SHARDED:
        from runner.store import sharded

        return getattr(sharded, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*_SHARDED, "LEASE", "LEGACY_RUN_ID", "MANIFEST", "RETRY_ATTEMPTS", "RETRY_BACKOFF_S", "STEP_RE",
           "CheckpointInfo", "CheckpointStore", "Lease", "LeaseHeld", "LocalTier", "StoppedWaiting", "best_first",
           "bytes_problem", "open_checkpoint", "retry_transient", "run_id_of", "score", "storage_errors", "storage_fault"]
