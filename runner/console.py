"""What a run prints: log lines (rank 0), warnings (any rank, tagged with it), the progress bar, epoch lines.

The one place that formats console output; the storage layer may import it (docs/design.md, "Modules")."""
from __future__ import annotations

import os
import sys
import time


def log(message: str, env=None) -> None:
    """One line on stdout from rank 0; other ranks stay quiet."""
    if env is None or env.is_main:
        print(f"[runner] {message}", flush=True)


def warn(message: str, env=None) -> None:
    """Warnings come from any rank, tagged with it."""
    print(f"[runner] WARNING: {rank_tag(env)}{message}", file=sys.stderr, flush=True)


def error(message: str) -> None:
    """The one line a RunnerError becomes (cli.py), tagged with the rank like a warning."""
    print(f"runner: error: {rank_tag()}{message}", file=sys.stderr, flush=True)


def rank_tag(env=None) -> str:
    """"rank N: " in a job of several processes (from `env`, else torchrun's environment), "" in one."""
    if env is not None:
        return f"rank {env.rank}: " if env.world_size > 1 else ""
    rank = os.environ.get("RANK")
    return f"rank {rank}: " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""


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

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_epoch(metrics: dict) -> str:
    parts = [f"epoch {metrics['epoch']}", f"step {metrics['step']}"]
    for key, value in metrics.items():
        if key == "partial":  # max_steps stopped the run inside the epoch
            parts.append("(partial epoch)")
        elif key not in ("epoch", "step"):
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " ".join(parts)
