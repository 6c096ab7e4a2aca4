"""`runner ckpt ls|verify` output: a table of a store's checkpoints, tolerant of whatever it finds; which one is
best by a metric (ls marks it, `runner export --checkpoint best` loads it)."""

from __future__ import annotations

from datetime import datetime, timezone

from runner.errors import CheckpointError
from runner.store import STEP_RE, CheckpointInfo, CheckpointStore, best_first, open_checkpoint, storage_errors


def _human(n: int) -> str:
    unit = next(u for u in range(4) if n < 1024 ** (u + 1) or u == 3)
    return f"{n} B" if unit == 0 else f"{n / 1024 ** unit:.1f} {('KiB', 'MiB', 'GiB')[unit - 1]}"


def _when(t: object) -> str:
    if type(t) not in (int, float):
        return "-"
    try:
        return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):  # a timestamp no calendar holds
        return "-"


def best_checkpoint(infos: list[CheckpointInfo], metric: str, mode: str = "min") -> CheckpointInfo | None:
    """The valid checkpoint with the best finite `metric` (the store's one ranking); None if none has it."""
    ranked = best_first(infos, metric, mode)
    return ranked[0] if ranked else None


def ranking_of(infos: list[CheckpointInfo]) -> tuple[str | None, str]:
    """checkpoint.metric and .mode of the config the newest valid checkpoint was written with."""
    newest = next((i for i in reversed(infos) if i.valid), None)
    config = newest.manifest.get("config") if newest else None  # valid: its manifest is well-formed
    section = config.get("checkpoint") if isinstance(config, dict) else None
    section = section if isinstance(section, dict) else {}
    mode = section.get("mode")
    return section.get("metric") if isinstance(section.get("metric"), str) else None, mode if mode == "max" else "min"


def epoch_of(manifest: dict) -> int | None:
    """The 1-based epoch a checkpoint's step was trained in, as the log numbers epochs ("epoch 4 step 92 …"):
    the manifest's `epoch` is the 0-based epoch to continue, so at an epoch's end it already names the next."""
    epoch, sample = manifest.get("epoch"), manifest.get("sample_in_epoch", 0)
    if type(epoch) is not int:
        return None
    return epoch if sample == 0 and epoch > 0 else epoch + 1


def _row(info: CheckpointInfo) -> list[str]:
    # The store hands over only well-formed manifests (or None); the listing is how a user finds out why.
    m = info.manifest or {}
    files = m.get("files", {})
    size = _human(sum(e["size"] for e in files.values())) if files else "-"
    shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in sorted(m.get("metrics", {}).items())) or "-"
    status = f"INVALID: {info.reason}" if not info.valid else f"valid ({info.note})" if info.note else "valid"
    epoch = epoch_of(m)
    return [str(info.step), "-" if epoch is None else str(epoch), _when(m.get("committed_at")), size, shown, status]


def _table(infos: list[CheckpointInfo]) -> str:
    rows = [["step", "epoch", "time (UTC)", "size", "metrics", "status"]] + [_row(i) for i in infos]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1] for r in rows)


def describe_listing(store: CheckpointStore, metric: str | None = None, mode: str | None = None) -> str:
    """A table of every checkpoint in `store` (cheap check, no hashing), the best by `metric`/`mode` marked;
    without `metric`, by the checkpoint.metric/mode the newest checkpoint was written with (if any)."""
    infos, uploads = store.list(), uploads_line(store)
    if not infos:
        return "\n".join(filter(None, [f"no checkpoints under {store.url}", uploads]))
    if metric is None:
        metric, saved_mode = ranking_of(infos)
        mode = mode or saved_mode
    mode = mode or "min"
    rows = _table(infos)
    best = best_checkpoint(infos, metric, mode) if metric else None
    if best is not None:
        rows = "\n".join(line + f", best {metric} ({mode})" if line.split(maxsplit=1)[0] == str(best.step) else line
                         for line in rows.splitlines())
    return "\n".join(filter(None, [rows, uploads]))


def uploads_line(store: CheckpointStore) -> str:
    """What interrupted S3 uploads left under the store (kept and billed until aborted), or ""."""
    try:
        with storage_errors("list the incomplete uploads under", store.url):
            uploads = store.incomplete_uploads()
    except CheckpointError as e:  # e.g. no s3:ListBucketMultipartUploads permission: the listing still stands
        return f"incomplete uploads: unknown ({e})"
    if not uploads:
        return ""
    each = ", ".join(f"{u.name} ({u.parts} part(s), {_human(u.size)})" for u in uploads)
    return (f"{len(uploads)} incomplete upload(s), {_human(sum(u.size for u in uploads))}, left by interrupted "
            f"writes (the next start removes them): {each}")


def run_verify(url: str, storage_options: dict | None = None) -> tuple[str, int]:
    """Fully verify one checkpoint (URL names step-*) or every checkpoint of a store; (text, exit code)."""
    if STEP_RE.fullmatch(url.rstrip("/").rpartition("/")[2]):
        store, info = open_checkpoint(url, storage_options)
        infos = [store.verify(info)]
    else:
        store = CheckpointStore(url, storage_options)
        infos = [store.verify(i) for i in store.list()]
        if not infos:  # nothing is invalid: a new or emptied directory is not corruption (as for ls)
            return f"no checkpoints under {store.url}: nothing to verify", 0
    bad = sum(not i.valid for i in infos)
    summary = f"{len(infos)} checkpoint(s) verified, {bad} invalid"
    return _table(infos) + "\n" + summary, 1 if bad else 0
