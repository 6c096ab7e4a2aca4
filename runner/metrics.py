"""What a run tells the user: log lines, a progress bar on terminals, metrics.jsonl. Rank 0 only."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def log(message: str, env=None) -> None:
    """One line on stdout from rank 0; other ranks stay quiet."""
    if env is None or env.is_main:
        print(f"[runner] {message}", flush=True)


def warn(message: str, env=None) -> None:
    """Warnings come from any rank, tagged with it."""
    tag = f"rank {env.rank}: " if env is not None and env.world_size > 1 else ""
    print(f"[runner] WARNING: {tag}{message}", file=sys.stderr, flush=True)


REDRAW_S = 0.1  # the progress bar redraws at most this often


class ProgressBar:
    """A single updating line with rate and ETA, only when stdout is a terminal. The loss shown is the running
    mean the loop last read (train.log_every_steps): the bar itself never reads a tensor."""

    def __init__(self, enabled: bool, total: int, epoch: int, max_epochs: int, start: int = 0):
        self.enabled, self.total, self.done = enabled, total, start
        self.label = f"epoch {epoch + 1}/{max_epochs}"
        self.t0, self.start, self.loss, self.drawn = time.monotonic(), start, None, 0.0

    def advance(self) -> None:
        self.done += 1
        self._draw()

    def show(self, loss: float) -> None:
        self.loss = loss
        self._draw()

    def _draw(self) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.drawn < REDRAW_S and self.done < self.total):
            return  # a terminal write per step would cost more than a tiny model's step
        self.drawn = now
        rate = (self.done - self.start) / max(time.monotonic() - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        filled = int(24 * self.done / max(self.total, 1))
        bar = "=" * filled + ">" + " " * (24 - filled)
        loss = "" if self.loss is None else f" loss {self.loss:.4f}"
        sys.stdout.write(f"\r{self.label} [{bar[:25]}] {self.done}/{self.total} {rate:.1f} it/s ETA {eta:4.0f}s{loss}  ")
        sys.stdout.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stdout.write("\n")
            sys.stdout.flush()


def format_epoch(metrics: dict) -> str:
    parts = [f"epoch {metrics['epoch'] + 1}", f"step {metrics['step']}"]
    for key, value in metrics.items():
        if key == "partial":  # max_steps stopped the run inside the epoch
            parts.append("(partial epoch)")
        elif key not in ("epoch", "step"):
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " ".join(parts)


def write_history(path: Path, history: list[dict]) -> None:
    """Rewrite metrics.jsonl from the (checkpointed) history, so a resumed run's file has no duplicates."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(m) + "\n" for m in history))


class StepRecord:
    """<out_dir>/last_step: the step rank 0 last reached, so the next start can say how many steps a kill cost.

    One fixed-width in-place write per step (a rename per step costs ~0.3 ms); a torn number reads as unknown.
    """

    def __init__(self, out_dir: str, enabled: bool):
        self.path, self.enabled, self.file = Path(out_dir) / "last_step", enabled, None

    def last(self) -> int:
        try:
            return int(self.path.read_text())
        except (OSError, ValueError):
            return 0

    def write(self, step: int) -> None:
        if not self.enabled:
            return
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "w")  # noqa: SIM115 — kept open for the run
        self.file.seek(0)
        self.file.write(f"{step:<20d}")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
