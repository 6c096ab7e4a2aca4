"""One exception family: the CLI prints these as one line and exits 2; anything else is a bug."""


class RunnerError(Exception):
    """A problem the user can fix: bad config, bad checkpoint, missing package."""


class ConfigError(RunnerError):
    """The job file or a CLI override is invalid."""


class CheckpointError(RunnerError):
    """A checkpoint cannot be written, read, verified or trusted."""
