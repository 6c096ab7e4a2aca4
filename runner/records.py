"""What a run records in out_dir for the user besides checkpoints and events: metrics.jsonl and last_step."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_history(path: Path, history: list[dict]) -> None:
    """Rewrite metrics.jsonl from the (checkpointed) history, so a resumed run's file has no duplicates."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(m) + "\n" for m in history))


class StepRecord:
    """<out_dir>/last_step: the step rank 0 last reached, so the next start can say how many steps a kill cost.

    One fixed-width pwrite per step (a rename costs ~0.3 ms, a buffered file's seek, write and flush ~3 µs); it
    survives a SIGKILL, as the page cache keeps it. A torn number reads as unknown.
    """

    def __init__(self, out_dir: str, enabled: bool):
        self.path, self.enabled, self.fd = Path(out_dir) / "last_step", enabled, None

    def last(self) -> int:
        try:
            return int(self.path.read_text())
        except (OSError, ValueError):
            return 0

    def write(self, step: int) -> None:
        if not self.enabled:
            return
        if self.fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, b"%-20d" % step, 0)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
