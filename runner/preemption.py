"""Stop signals → a stop request that the loop agrees on across ranks at the next step boundary.

The handler only records the signal (the one piece of module-level mutable state in runner); the loop
then saves a checkpoint of the step it reached and exits with PREEMPTED_EXIT.
"""
from __future__ import annotations

import signal

from .errors import ConfigError

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "stopped on request with a checkpoint; run the same command to resume"
EMERGENCY_SAVE_FAILED_EXIT = 3

_requested: str | None = None


def install(extra_signal: str | None) -> dict:
    """Catch SIGTERM, SIGINT and the configured extra signal (default SIGUSR1); returns the old handlers."""
    global _requested
    _requested = None
    names = ["SIGTERM", "SIGINT"] + ([extra_signal] if extra_signal else [])
    sigs = [getattr(signal, name, None) for name in names]
    for name, sig in zip(names, sigs):
        if not isinstance(sig, signal.Signals):
            raise ConfigError(f"preemption.extra_signal: unknown signal '{name}' (e.g. SIGUSR1, SIGUSR2)")
    return {sig: signal.signal(sig, _record) for sig in sigs}


def uninstall(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _record(signum, _frame) -> None:
    global _requested
    _requested = signal.Signals(signum).name


def requested() -> str | None:
    """Name of the stop signal received by this process, if any."""
    return _requested
