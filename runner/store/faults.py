"""What a storage failure means: transient (retry later) or permanent (fix the URL, permissions or credentials).

The one classification of storage errors, `storage_fault`, and `storage_errors`, which turns a failing storage
call into a one-line StorageError / StorageUnavailable naming the URL. Used by the checkpoint store, the
checkpointer and the lease; `retry_transient` is the one retry rule (attempts and backoff). See docs/design.md,
"Checkpoints and resume".
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Callable
from typing import Literal, TypeVar

from runner.errors import RunnerError, StorageError, StorageUnavailable, one_line

RETRY_ATTEMPTS = 3  # every storage operation runner retries: reads, the probe, each periodic save
RETRY_BACKOFF_S = 1.0  # doubles after each failed attempt: 1 s, then 2 s
_sleep = time.sleep  # retry_transient's pause; tests replace it
T = TypeVar("T")

# storage_fault's evidence. Class names, not classes, so that no cloud SDK is imported to classify its errors.
_TRANSIENT_NAMES = frozenset({
    "TimeoutError", "ConnectionError", "gaierror", "herror", "IncompleteRead",  # builtins, socket, http.client
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",  # botocore
    "ClientConnectionError", "ServerTimeoutError", "ClientPayloadError",  # aiohttp
})
_PERMANENT_NAMES = frozenset({
    "PermissionError", "FileNotFoundError", "NotADirectoryError", "IsADirectoryError", "TypeError", "ValueError",
    "NoCredentialsError", "PartialCredentialsError",  # botocore
})
_TRANSIENT_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                              "TooManyRequestsException", "RequestTimeout", "InternalError", "ServiceUnavailable"})
_PERMANENT_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "NoSuchBucket",
                              "ExpiredToken", "InvalidToken", "AllAccessDisabled", "AccountProblem"})
_TRANSIENT_ERRNOS = frozenset({errno.ETIMEDOUT, errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED,
                               errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EAGAIN,
                               errno.ENOSPC, errno.EDQUOT})  # a full disk can be freed: by pruning, by someone
_STORAGE_LIBS = frozenset({"botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "adlfs", "azure", "google",
                           "fsspec", "requests", "urllib3"})

Fault = Literal["transient", "permanent"]



def _fault_of(exc: BaseException) -> Fault | None:
    """What this one exception says about retrying, or None if it says nothing (look at its cause)."""
    if isinstance(exc, RunnerError):
        return "transient" if isinstance(exc, StorageUnavailable) else "permanent"
    response, status = getattr(exc, "response", None), None
    if isinstance(response, dict):  # botocore's ClientError
        code = (response.get("Error") or {}).get("Code")
        if code in _PERMANENT_CODES:
            return "permanent"
        if code in _TRANSIENT_CODES:
            return "transient"
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & _PERMANENT_NAMES:
        return "permanent"
    if names & _TRANSIENT_NAMES or getattr(exc, "errno", None) in _TRANSIENT_ERRNOS:
        return "transient"
    if status is None:  # other HTTP clients' errors: aiohttp, requests, google, azure
        values = (getattr(exc, attr, None) for attr in ("status_code", "status", "code"))
        status = next((v for v in values if type(v) is int), None)
    if type(status) is not int or status < 400:
        return None
    return "transient" if status >= 500 or status in (408, 429) else "permanent"


def storage_fault(exc: BaseException) -> Fault:
    """Classify a storage failure: "transient" if retrying the same operation can help (timeouts, refused or
    reset connections, HTTP 5xx, throttling, a full disk), else "permanent" (credentials, permissions, no such bucket or
    path, a value that cannot be serialized, anything unrecognised). Looks through the chain of causes: backends
    wrap the client's error (s3fs turns a 503 SlowDown into a bare OSError caused by botocore's ClientError)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if fault := _fault_of(cause):
            return fault
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    return "permanent"


def is_storage_exc(exc: Exception) -> bool:
    """Whether storage_errors translates `exc`: an OS, fsspec or cloud-client error, or a value storage refused."""
    return isinstance(exc, (OSError, TypeError, ValueError)) or any(
        cls.__module__.partition(".")[0] in _STORAGE_LIBS for cls in type(exc).__mro__)


@contextlib.contextmanager
def storage_errors(action: str, url: str):
    """Turn storage failures into one-line StorageError / StorageUnavailable that name the URL and the cause."""
    try:
        yield
    except RunnerError:
        raise
    except Exception as e:
        if not is_storage_exc(e):
            raise
        detail = one_line(e)
        if storage_fault(e) == "transient":
            raise StorageUnavailable(f"cannot {action} {url}: {detail}; try again later, or check the network, "
                                     "the endpoint and free space") from e
        raise StorageError(
            f"cannot {action} {url}: {detail}; check the path, permissions and storage credentials") from e

def retry_transient(fn: Callable[[], T], what: str, attempts: int = RETRY_ATTEMPTS,
                    backoff_s: float = RETRY_BACKOFF_S) -> T:
    """fn(), called again after a doubling pause while it fails transiently; then StorageUnavailable naming
    `what` (e.g. "reading s3://b/ckpt/step-000000005/state.pt"). Other errors propagate at once."""
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as e:
            if storage_fault(e) == "permanent":
                raise
            if attempt >= attempts:
                detail = str(e) if isinstance(e, RunnerError) else one_line(e)
                raise StorageUnavailable(f"{what} failed {attempts} times; last error: {detail}") from e
        _sleep(backoff_s * 2 ** (attempt - 1))
        attempt += 1
