"""<out_dir>/tb: TensorBoard scalars (metrics.tensorboard), written by rank 0 next to metrics.jsonl.

Per log step (train.log_every_steps) the running loss and the learning rate, per epoch every numeric metric of
the epoch's record, all at their optimizer step. Only values the loop has already read are written: no host sync.
A resumed launch opens the writer with purge_step = resumed step + 1, so TensorBoard discards what an earlier
launch wrote after the checkpoint and the curves continue without duplicate or out-of-order steps. Flushed at
epoch ends and at exit; a killed launch loses what was written since the last flush (at most the writer's
flush_secs, 120 s).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ConfigError

TB_DIR = "tb"
POSITION = ("epoch", "step")  # where an epoch record sits, not what it measured


def summary_writer_class() -> type:
    """torch's SummaryWriter, or a one-line error if the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("metrics.tensorboard is true but the tensorboard package is not installed; "
                          "pip install 'runner-train[tensorboard]' or set metrics.tensorboard: false") from None
    return SummaryWriter


class TensorBoard:
    """Rank 0's writer when metrics.tensorboard is on; otherwise (enabled=False) every call does nothing.

    Construct it before training (a missing package fails at once), then `open(step)` once the resumed step is
    known.
    """

    def __init__(self, out_dir: str, enabled: bool):
        self.folder = Path(out_dir) / TB_DIR
        self.writer_class = summary_writer_class() if enabled else None
        self.writer: Any = None

    def open(self, step: int) -> None:
        """Start writing after `step`, the step this launch starts from."""
        if self.writer_class is not None:
            self.writer = self.writer_class(log_dir=str(self.folder), purge_step=step + 1)

    def log_step(self, step: int, running_loss: float, lr: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("train/loss_running", running_loss, step)
            self.writer.add_scalar("train/lr", lr, step)

    def log_epoch(self, metrics: dict) -> None:
        """Every numeric value of an epoch record as epoch/<name> at its step, then flush."""
        if self.writer is None:
            return
        for name, value in epoch_values(metrics).items():
            self.writer.add_scalar(name, value, metrics["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def epoch_values(metrics: dict) -> dict[str, float]:
    """Every numeric value of an epoch record as epoch/<name>: the names every tracker uses."""
    return {f"epoch/{name}": float(value) for name, value in metrics.items()
            if name not in POSITION and isinstance(value, (int, float)) and not isinstance(value, bool)}
