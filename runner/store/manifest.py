"""MANIFEST.json: the record that makes a step directory a checkpoint, and the one gate every manifest passes.

A manifest lists each file of its checkpoint with size and sha256, and, on object stores, the fresh name it
is stored under ("object"). `parse_manifest` accepts only well-formed manifests, so no consumer ever sees a
malformed one. Knows JSON and names, not storage. See docs/design.md, "Checkpoints and resume".
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable

from runner.errors import CheckpointError, one_line

MANIFEST = "MANIFEST.json"
_MAX_DEPTH = 64  # deeper manifests are not ours, and recursive consumers (json.dumps, pickle) could overflow
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def _plain_name(name: object) -> bool:
    """A file name that stays inside its checkpoint directory and is not the manifest."""
    return isinstance(name, str) and bool(name) and "/" not in name and not name.startswith(".") and name != MANIFEST


def check_files(files: dict) -> None:
    """Refuse, before anything is written, a file name that a manifest could not list."""
    for name in files:
        if not _plain_name(name):
            raise CheckpointError(f"invalid checkpoint file name {name!r}: use a plain name such as state.pt")


def fresh_object(name: str, nonce: str) -> str:
    """The object-store name of file `name` in one commit (state.pt -> state.<nonce>.pt)."""
    stem, dot, ext = name.rpartition(".")
    return f"{stem}.{nonce}.{ext}" if dot else f"{name}.{nonce}"


def stored_object(name: str, entry: dict) -> str:
    """The stored object of a manifest file entry ("object" absent: stored under its own name)."""
    return entry.get("object", name)


def unreferenced(manifest: dict, present: Iterable[str]) -> list[str]:
    """Files of a checkpoint directory that its manifest does not reference (leftovers of a failed rewrite)."""
    referenced = {MANIFEST} | {stored_object(n, e) for n, e in manifest["files"].items()}
    return sorted(set(present) - referenced)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _too_deep(obj: object) -> bool:
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > _MAX_DEPTH:
            return True
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _entry_problem(name: str, entry: object) -> str:
    if not _plain_name(name):
        return f"file name {_short(name)} is not a plain name"
    if not isinstance(entry, dict):
        return f"{name}: entry is not an object"
    size, sha, obj = entry.get("size"), entry.get("sha256"), stored_object(name, entry)
    if type(size) is not int or size < 0:
        return f"{name}: size {_short(size)} is not a non-negative integer"
    if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
        return f"{name}: sha256 {_short(sha)} is not 64 hex digits"
    if not _plain_name(obj):
        return f"{name}: object {_short(obj)} is not a plain name"
    return ""


def bytes_problem(name: str, data: bytes, entry: dict) -> str:
    """Why `data` are not the bytes of the manifest entry `entry` for file `name` (size, then sha256); "" if they
    are."""
    if len(data) != entry["size"]:
        return f"{name}: size {len(data)} != {entry['size']}"
    return f"{name}: sha256 mismatch" if hashlib.sha256(data).hexdigest() != entry["sha256"] else ""


def parse_manifest(blob: bytes, step: int | None) -> tuple[dict | None, str, str]:
    """The one gate for manifests: (manifest, problem, note). A manifest with a problem comes back as None, so
    no consumer ever sees a malformed one; `note` names a flaw that is tolerated (metrics ignored)."""
    try:
        manifest = json.loads(blob)
    except (ValueError, RecursionError) as e:  # RecursionError: crafted nesting such as "[" * 100000
        return None, f"manifest unreadable: {one_line(e)}", ""
    if not isinstance(manifest, dict):
        return None, "manifest malformed: not a JSON object", ""
    if _too_deep(manifest):
        return None, f"manifest malformed: nested deeper than {_MAX_DEPTH} levels", ""
    if step is not None and "step" in manifest and (type(manifest["step"]) is not int or manifest["step"] != step):
        return None, f"manifest step {_short(manifest['step'])} != directory step {step}", ""
    files = manifest.get("files")
    if not isinstance(files, dict):
        return None, "manifest malformed: no 'files' object", ""
    for name, entry in files.items():
        if problem := _entry_problem(name, entry):
            return None, f"manifest malformed: {problem}", ""
    if isinstance(manifest.get("metrics", {}), dict):
        return manifest, "", ""
    return {**manifest, "metrics": {}}, "", "metrics ignored: not a JSON object"


def size_problem(manifest: dict, sizes: dict[str, int]) -> str:
    """Cheap validity check: every file's object is present with its recorded size."""
    for name, entry in sorted(manifest["files"].items()):
        obj = stored_object(name, entry)
        if obj not in sizes:
            return f"{name}: missing"
        if sizes[obj] != entry["size"]:
            return f"{name}: size {sizes[obj]} != {entry['size']}"
    return ""


def score(manifest: dict, metric: str | None) -> int | float | None:
    """The retention metric of a valid checkpoint's manifest; None (unscored) unless it is a finite number."""
    value = manifest.get("metrics", {}).get(metric)
    return value if type(value) is int or (type(value) is float and math.isfinite(value)) else None


LEGACY_RUN_ID = "legacy"  # the run of a format-1 manifest, written before manifests named their run


def run_id_of(manifest: dict) -> str:
    """The run (lineage) a valid checkpoint's manifest belongs to."""
    return str(manifest.get("run_id") or LEGACY_RUN_ID)
