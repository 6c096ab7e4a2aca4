"""When to save, where to resume from, and writing in the background with retries.

The loop asks `due()` and hands over a snapshot (bytes); the store's commit rule makes each write
all-or-nothing, so a failed or interrupted write never leaves a checkpoint that resume would pick.
"""
from __future__ import annotations

import threading
import time

from .checkpoint import CheckpointInfo, CheckpointStore
from .config import CheckpointConfig
from .dist import DistEnv
from .errors import CheckpointError
from .metrics import log, warn

RETRIES = 3          # attempts per periodic save before giving up until the next cadence
BACKOFF_S = 1.0      # first retry delay; doubles each attempt


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, url: str, env: DistEnv):
        self.cfg, self.url, self.env = cfg, url, env
        self.store = CheckpointStore(url, cfg.storage_options)
        self.last_save = time.monotonic()
        self.last_committed: int | None = None
        self.writer: threading.Thread | None = None
        self.write_ok = True

    def due(self, step: int) -> bool:
        """Step cadence or wall-time cadence (this rank's clock; the loop makes all ranks agree)."""
        if self.step_due(step):
            return True
        minutes = self.cfg.every_minutes
        return bool(minutes) and time.monotonic() - self.last_save >= minutes * 60

    def step_due(self, step: int) -> bool:
        """The step cadence alone: the same on every rank, no agreement needed."""
        return bool(self.cfg.every_steps) and step % self.cfg.every_steps == 0

    def find_resume(self, mode: str) -> tuple[CheckpointInfo | None, bytes | None]:
        """Rank 0 only: clean leftovers of interrupted writes, then pick the checkpoint to resume and read it."""
        for url in self.store.cleanup_partial():
            warn(f"removed incomplete checkpoint write {url}")
        if mode == "never":
            return None, None
        if mode != "auto":
            info = self.store.info(mode)
            if not info.valid:
                raise CheckpointError(f"resume.mode: {mode} is not a valid checkpoint ({info.reason}); "
                                      "run `runner ckpt ls` to see valid ones")
            return info, self.store.read(info)
        return self.store.read_latest(warn=warn) or (None, None)

    def save(self, data: bytes | None, meta: dict, emergency: bool = False) -> None:
        """Rank 0 writes `data` in the background (others pass None); one write at a time.

        An emergency save (the process is about to exit) is tried once: the grace period has no room for backoff.
        """
        self.last_save = time.monotonic()
        if data is None:
            return
        self.wait()
        # A daemon thread, so a write hung on a dead server cannot keep a preempted process alive.
        self.writer = threading.Thread(target=self._write, args=(data, meta, emergency), daemon=True)
        self.writer.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Finish the pending write; False if it failed or did not finish within `timeout` seconds."""
        if self.writer is None:
            return True
        self.writer.join(timeout)
        if self.writer.is_alive():
            return False
        self.writer = None
        return self.write_ok

    def _write(self, data: bytes, meta: dict, emergency: bool) -> None:
        step, attempts = meta["step"], 1 if emergency else RETRIES
        self.write_ok = False
        for attempt in range(1, attempts + 1):
            try:
                url = self.store.commit(step, {"state.pt": data}, meta)
                break
            except Exception as e:  # noqa: BLE001 — any storage fault (network, disk full) is retried
                if attempt == attempts:
                    then = "" if emergency else " Training continues; the next save will try again."
                    warn(f"CHECKPOINT FAILED: step {step} was not saved to {self.url} after {attempts} "
                         f"attempt(s): {e}. The last committed step is {self.last_committed}.{then}")
                    return
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        self.last_committed = step
        log(f"checkpoint step {step} committed: {url}")
        self.write_ok = True
        self.prune()

    def prune(self) -> None:
        try:
            for url in self.store.prune(self.cfg.keep_last, self.cfg.keep_best, self.cfg.metric, self.cfg.mode):
                log(f"pruned {url}")
        except Exception as e:  # noqa: BLE001 — a failed prune costs disk space, not training
            warn(f"pruning {self.url} failed: {e}")

