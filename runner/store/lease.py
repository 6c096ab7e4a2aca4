"""One writer per checkpoint directory: a best-effort lease stored as `<dir>/LEASE.json`.

A double-submitted job, an orphaned worker or an old VM still uploading must not write into a live run's
checkpoint directory, and a starting run's cleanup of partial writes must not delete a write in progress.
Object stores (S3, GCS) offer neither rename nor lock, only whole-object PUT, GET and DELETE, so the lease
is a small JSON record, {"owner", "host", "pid", "heartbeat", "ttl_s"}, that its holder rewrites every ttl_s/3:

- A starter takes the lease when it is absent, unreadable, expired (no heartbeat for its ttl_s) or held by
  a process of this host that no longer exists (a torchrun restart or a rerun after SIGKILL takes over at
  once). It writes its record, waits SETTLE_S and reads it back: with no compare-and-swap the last writer
  wins, and a starter that reads someone else's record has lost the race and waits like everyone else.
- A live holder makes a starter wait up to ttl_s + WAIT_MARGIN_S for the lease to expire, then fail
  with LeaseHeld; a stop requested meanwhile (`should_stop`) ends the wait at once with StoppedWaiting.
- A holder whose heartbeat finds another owner's record has been fenced out (`lost`), and `still_ours()`
  right before each commit keeps it from committing.

What this guarantees: a stale writer is fenced out within one heartbeat, and a starter never cleans up
while another run's lease is live. What it does not: it is not a strict mutex on object stores. A writer
paused longer than the TTL between its still_ours() check and its commit can still write once, and two
starters whose read-to-write gaps exceed SETTLE_S can both believe they hold it until the next heartbeat
settles it. Expiry compares wall clocks across machines, so their clocks must agree to well within
ttl_s (NTP). "This host" means the same hostname; containers that share a hostname but not a pid
namespace (e.g. host networking) would see each other's processes as dead.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable

from runner.console import log, warn
from runner.errors import CheckpointError, one_line
from runner.store.faults import storage_errors

LEASE = "LEASE.json"  # at the store root, where the store's listing (step-* directories only) ignores it
SETTLE_S = 0.2  # how long a starter waits before reading its record back to see who won
POLL_S = 1.0  # how often a waiting starter looks again (at most; a short TTL polls faster)
WAIT_MARGIN_S = 5.0  # default wait beyond the TTL: the holder's last heartbeat may be just now


class LeaseHeld(CheckpointError):
    """Another live run holds the checkpoint directory's lease."""
    exit_status = 2


class StoppedWaiting(LeaseHeld):
    """A stop was requested while waiting for another run's lease: nothing was trained, nothing is lost. Exits
    128 + the signal's number (143 for SIGTERM, also for a cloud notice), as a process the signal ended would."""

    def __init__(self, message: str, reason: str = "SIGTERM"):  # the default: unpickling passes only the message
        super().__init__(message)
        self.exit_status = 128 + getattr(signal.Signals, reason, signal.SIGTERM)


def _parse(blob: bytes) -> dict | None:
    """The lease record, or None when it is garbled (a record nobody can hold to)."""
    try:
        record = json.loads(blob)
    except ValueError:
        return None
    types = {"owner": str, "host": str, "pid": int, "heartbeat": (int, float), "ttl_s": (int, float)}
    if isinstance(record, dict) and all(isinstance(record.get(k), t) for k, t in types.items()):
        return record
    return None


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, under another user
        pass
    return False


def _takeover_reason(record: dict | None) -> str:
    """Why a starter may take this lease over; "" when its holder is live."""
    if record is None:
        return "no lease"
    age = time.time() - record["heartbeat"]
    if age > record["ttl_s"]:
        return f"no heartbeat for {age:.0f}s, ttl {record['ttl_s']:g}s"
    if record["host"] == socket.gethostname() and _process_gone(record["pid"]):
        return f"process {record['pid']} has exited"
    return ""


def _holder(record: dict) -> str:
    return f"host {record['host']}, pid {record['pid']}, heartbeat {time.time() - record['heartbeat']:.0f}s ago"


class Lease:
    """The lease on one checkpoint directory: `fs` and `root_path` locate it, `url` names it in messages."""

    def __init__(self, fs, root_path: str, url: str, ttl_s: float = 60.0, owner: str | None = None):
        self.fs, self.url, self.ttl_s = fs, url, ttl_s
        self.root = root_path.rstrip("/") or "/"
        self.path = f"{self.root.rstrip('/')}/{LEASE}"
        self.owner = owner or uuid.uuid4().hex
        self.lost = False  # set by the heartbeat when another run took the lease over
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        self._local = bool({"file", "local"} & set(protocols))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            return _parse(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None

    def _write(self) -> None:
        record = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                  "heartbeat": time.time(), "ttl_s": self.ttl_s}
        blob = json.dumps(record).encode()
        if not self._local:  # one PUT: readers see the old record or the new one, never a part
            self.fs.pipe_file(self.path, blob)
            return
        # A local file is rewritten in place, so a reader could see it half written (garbled = free)
        os.makedirs(self.root, exist_ok=True)
        tmp = f"{self.path}.{self.owner}.tmp"
        self.fs.pipe_file(tmp, blob)
        os.replace(tmp, self.path)

    def _claim(self) -> dict | None:
        """Write our record if the lease is free and read it back; None when we hold it, else the holder's."""
        record = self._read()
        if record is not None and record["owner"] == self.owner:
            return None
        reason = _takeover_reason(record)
        if not reason:
            return record
        if record is not None:
            log(f"taking over the lease on {self.url} from another run ({_holder(record)}): {reason}")
        self._write()
        time.sleep(SETTLE_S)
        record = self._read()
        return None if record is not None and record["owner"] == self.owner else record

    def acquire(self, wait_s: float | None = None, should_stop: Callable[[], str | None] = lambda: None) -> None:
        """Take the lease, waiting up to `wait_s` (default ttl_s + WAIT_MARGIN_S) for a live holder's to expire;
        `should_stop()` names a stop requested meanwhile (e.g. "SIGTERM"), which ends the wait (StoppedWaiting)."""
        wait_s = self.ttl_s + WAIT_MARGIN_S if wait_s is None else wait_s
        start, waited_for = time.monotonic(), None
        while True:
            with storage_errors("take the lease on", self.url):
                holder = self._claim()
            if holder is None:
                if waited_for is not None:
                    log(f"took the lease on {self.url} after waiting {time.monotonic() - start:.0f}s")
                return
            left = start + wait_s - time.monotonic()
            if stop := should_stop():
                raise StoppedWaiting(f"stopped by {stop} while waiting for the lease on {self.url}, held by another "
                                     f"run ({_holder(holder)}); nothing was trained", stop)
            if left <= 0:
                raise LeaseHeld(f"{self.url} is being written by another run ({_holder(holder)}); stop it, "
                                f"or wait until its lease expires (ttl {holder['ttl_s']:g}s)")
            if holder["owner"] != waited_for:
                waited_for = holder["owner"]
                log(f"{self.url} is leased by another run ({_holder(holder)}, ttl {holder['ttl_s']:g}s); "
                    f"waiting up to {left:.0f}s for its lease to expire")
            time.sleep(min(POLL_S, self.ttl_s / 4, left))

    def renew(self) -> bool:
        """Refresh our heartbeat; False when another run holds the lease (we were fenced out).

        A missing or garbled record is rewritten: no other run holds it. A storage error returns True and
        the next renewal tries again: training must not die of one failed PUT, and if renewals keep failing
        the lease expires, another run may take it, and still_ours() stops our next commit.
        """
        try:
            record = self._read()
            if record is not None and record["owner"] != self.owner:
                return False
            self._write()
        except OSError:
            pass  # transient, as far as we know: see above
        return True

    def still_ours(self) -> bool:
        """Is the lease's record ours? Checked right before a commit: a fenced-out writer must not commit."""
        with storage_errors("read the lease of", self.url):
            record = self._read()
        return record is not None and record["owner"] == self.owner

    def start_heartbeat(self, every_s: float | None = None) -> None:
        """Renew from a daemon thread every `every_s` (default ttl_s / 3); sets `lost` and stops when fenced out."""
        every_s = self.ttl_s / 3 if every_s is None else every_s
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, args=(every_s,), name="runner-lease", daemon=True)
        self._thread.start()

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                renewed = self.renew()
            except Exception as err:  # e.g. botocore's connection errors are not OSErrors; the next beat retries
                warn(f"lease heartbeat on {self.url} failed ({one_line(err)}); retrying")
                continue
            if not renewed:
                self.lost = True
                warn(f"{self.url} was taken over by another run; this run must stop writing checkpoints there")
                return

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours (else it expires after ttl_s)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            if self.still_ours():
                self.fs.rm(self.path)
        except (OSError, CheckpointError) as err:
            warn(f"could not release the lease on {self.url} ({err}); it expires after {self.ttl_s:g}s")
