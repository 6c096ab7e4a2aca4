"""One exception family: the CLI prints these as one line and exits with `exit_status`; anything else is a bug."""


class RunnerError(Exception):
    """A problem the user can fix: bad config, bad checkpoint, missing package."""

    exit_status = 2  # the user must change something before running again


class ConfigError(RunnerError):
    """The job file or a CLI override is invalid."""


class CheckpointError(RunnerError):
    """A checkpoint cannot be written, read, verified or trusted."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint's content does not match its manifest, or it has no usable manifest: use another one."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message  # short, e.g. "state.pt: sha256 mismatch", for "skipping …" warnings


class StorageError(CheckpointError):
    """Storage refuses permanently (credentials, permissions, no such bucket or path): retrying cannot help."""


class StorageUnavailable(CheckpointError):
    """Storage did not answer (timeouts, refused connections, 5xx, throttling), still after retries."""

    exit_status = 1  # the same command may succeed later


def one_line(exc: BaseException) -> str:
    """An exception as "Type: first line of its message", for one-line errors that name their cause (torch's
    messages run to many lines of detail)."""
    lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
