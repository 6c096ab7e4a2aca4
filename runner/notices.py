"""Cloud preemption notices: a spot/preemptible VM's metadata service announces its end before any signal.

`detect` picks the provider (`preemption.notice`); `auto` decides from this machine's DMI strings alone and
sends no packet unless the DMI names a cloud or a metadata URL was given explicitly. A NoticeWatcher polls
the provider on a daemon thread (never the training thread) and calls `on_notice` once; the caller turns
that into the same stop request a SIGTERM makes.

- AWS (spot): IMDSv2 token, then `spot/instance-action` (404 until the two-minute notice); deadline = `time`.
- GCP (spot/preemptible): `instance/preempted` long-polled; TRUE about 30 s before the stop.
- Azure (spot): Scheduled Events, a `Preempt` event for this VM; deadline = `NotBefore`. Acknowledging it
  (after the checkpoint is committed) lets the VM go at once.
"""
from __future__ import annotations

import email.utils
import json
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Protocol
from urllib.parse import urlencode, urlparse

from .console import warn
from .errors import ConfigError

AWS_METADATA_URL = "http://169.254.169.254"
GCP_METADATA_URL = "http://metadata.google.internal"
AZURE_METADATA_URL = "http://169.254.169.254"
METADATA_URL_ENV = "RUNNER_METADATA_URL"  # per node: the job file is the same on every node
DMI_DIR = "/sys/class/dmi/id"
CHOICES = ("auto", "aws", "gcp", "azure", "off")

HTTP_TIMEOUT_S = 2.0
DEFAULT_POLL_S = 5.0  # AWS's recommended interval for instance-action
GCP_NOTICE_S = 30.0  # documented: preempted turns TRUE about 30 s before the hard stop
AZURE_NOTICE_S = 30.0  # documented minimum notice of a Preempt event (used when NotBefore is empty)
AWS_TOKEN_TTL_S = 21600
AWS_TOKEN_MARGIN_S = 60.0  # fetch a new token this long before the old one expires
AZURE_API = "2020-07-01"
AZURE_FIRST_TIMEOUT_S = 120.0  # documented: the first Scheduled Events request enables it and may take 2 min
# Azure VMs carry this chassis asset tag; without it "Microsoft Corporation" is any Hyper-V VM (a laptop's).
AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"

# Metadata services are local to the VM: never route them through an HTTP(S)_PROXY from the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Notice:
    provider: str  # aws, gcp, azure
    action: str  # aws: terminate|stop|hibernate; gcp: preempted; azure: Preempt
    deadline: float  # wall-clock epoch seconds by which the VM is taken
    event_id: str | None = None  # azure: what acknowledge() starts

    def seconds_left(self) -> float:
        return self.deadline - time.time()

    def monotonic_deadline(self) -> float:
        """The deadline on time.monotonic()'s clock (what preemption.deadline uses)."""
        return time.monotonic() + self.seconds_left()

    def describe(self) -> str:
        when = datetime.fromtimestamp(self.deadline).astimezone().isoformat(timespec="seconds")
        event = f" (event {self.event_id})" if self.event_id else ""
        return (f"{self.provider} preemption notice: {self.action}{event}, the VM goes at {when} "
                f"({self.seconds_left():.0f} s from now)")


class Provider(Protocol):
    name: str
    base: str
    long_polls: bool  # poll() itself waits up to the poll interval for a change

    def poll(self) -> Notice | None: ...

    def acknowledge(self, notice: Notice) -> None: ...


class MetadataUnavailable(Exception):
    """The metadata service did not answer as expected (transient: the watcher retries)."""


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def _request(method: str, url: str, headers: dict[str, str], body: bytes | None = None,
             timeout: float = HTTP_TIMEOUT_S) -> Reply:
    """One HTTP exchange; any status is a Reply, a connection failure or timeout is MetadataUnavailable."""
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with _opener.open(req, timeout=timeout) as resp:
            return Reply(resp.status, dict(resp.headers), resp.read())
    except urllib.error.HTTPError as e:
        with e:
            return Reply(e.code, dict(e.headers or {}), e.read())
    except (OSError, ValueError) as e:  # URLError, timeouts, resets; ValueError: a malformed URL
        reason = getattr(e, "reason", None) or e
        raise MetadataUnavailable(f"{method} {url}: {reason}") from None


def _unexpected(method: str, url: str, reply: Reply) -> MetadataUnavailable:
    return MetadataUnavailable(f"{method} {url}: HTTP {reply.status} {reply.body[:200]!r}")


def _json(url: str, reply: Reply) -> dict:
    try:
        data = json.loads(reply.body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise MetadataUnavailable(f"GET {url}: not a JSON object: {reply.body[:200]!r}")
    return data


class AwsProvider:
    """EC2 spot: IMDSv2 (PUT a session token, then GET with it); instance-action is 404 until the notice."""

    name, long_polls = "aws", False

    def __init__(self, base: str = AWS_METADATA_URL):
        self.base = base.rstrip("/")
        self.token: str | None = None
        self.token_expires = 0.0  # time.monotonic()

    def poll(self) -> Notice | None:
        url = f"{self.base}/latest/meta-data/spot/instance-action"
        reply = _request("GET", url, {"X-aws-ec2-metadata-token": self._token()})
        if reply.status == 401:  # expired or revoked (e.g. the service restarted): one fresh token
            self.token = None
            reply = _request("GET", url, {"X-aws-ec2-metadata-token": self._token()})
        if reply.status == 404:
            return None
        if reply.status != 200:
            raise _unexpected("GET", url, reply)
        action = _json(url, reply)
        try:
            deadline = datetime.fromisoformat(str(action["time"]).replace("Z", "+00:00")).timestamp()
            return Notice("aws", str(action["action"]), deadline)
        except (KeyError, ValueError):
            raise MetadataUnavailable(f"GET {url}: unexpected instance-action {reply.body[:200]!r}") from None

    def _token(self) -> str:
        if self.token is None or time.monotonic() >= self.token_expires:
            url = f"{self.base}/latest/api/token"
            try:
                reply = _request("PUT", url, {"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL_S)})
            except MetadataUnavailable as e:
                # IMDSv2's PUT reply has a hop limit (default 1 on some AMIs): a container may never see it
                raise MetadataUnavailable(f"{e} (in a container, the instance's metadata hop limit must "
                                          "be at least 2: aws ec2 modify-instance-metadata-options "
                                          "--http-put-response-hop-limit 2)") from None
            if reply.status != 200:
                raise _unexpected("PUT", url, reply)
            self.token = reply.body.decode().strip()
            self.token_expires = time.monotonic() + AWS_TOKEN_TTL_S - AWS_TOKEN_MARGIN_S
        return self.token

    def acknowledge(self, notice: Notice) -> None:
        pass  # AWS takes no acknowledgement


class GcpProvider:
    """GCE spot/preemptible: `instance/preempted` turns TRUE; long-polled with wait_for_change and the ETag,
    so a change is seen at once and nothing is missed between requests."""

    name, long_polls = "gcp", True

    def __init__(self, base: str = GCP_METADATA_URL, poll_s: float = DEFAULT_POLL_S):
        self.base = base.rstrip("/")
        self.wait_s = max(1, round(poll_s))  # timeout_sec takes whole seconds
        self.etag: str | None = None

    def poll(self) -> Notice | None:
        url = f"{self.base}/computeMetadata/v1/instance/preempted"
        timeout = HTTP_TIMEOUT_S
        if self.etag is not None:  # the first request reads the current value; later ones wait for a change
            url += "?" + urlencode({"wait_for_change": "true", "last_etag": self.etag, "timeout_sec": self.wait_s})
            timeout += self.wait_s
        reply = _request("GET", url, {"Metadata-Flavor": "Google"}, timeout=timeout)
        if reply.status != 200:
            raise _unexpected("GET", url, reply)
        self.etag = reply.headers.get("ETag") or reply.headers.get("etag")
        if reply.body.decode().strip().upper() == "TRUE":
            return Notice("gcp", "preempted", time.time() + GCP_NOTICE_S)
        return None

    def acknowledge(self, notice: Notice) -> None:
        pass  # GCP takes no acknowledgement


class AzureProvider:
    """Azure spot: a Scheduled Events `Preempt` event naming this VM (events cover the whole availability set
    or scale set, so another VM's preemption must not stop this job)."""

    name, long_polls = "azure", False

    def __init__(self, base: str = AZURE_METADATA_URL):
        self.base = base.rstrip("/")
        self.url = f"{self.base}/metadata/scheduledevents?api-version={AZURE_API}"
        self.vm_name: str | None = None
        self.enabled = False  # after the first answer, requests are fast

    def poll(self) -> Notice | None:
        if self.vm_name is None:
            self.vm_name = self._vm_name()
        timeout = HTTP_TIMEOUT_S if self.enabled else AZURE_FIRST_TIMEOUT_S
        reply = _request("GET", self.url, {"Metadata": "true"}, timeout=timeout)
        if reply.status != 200:
            raise _unexpected("GET", self.url, reply)
        self.enabled = True
        for event in _json(self.url, reply).get("Events") or []:
            resources = event.get("Resources") or []
            if event.get("EventType") == "Preempt" and (not resources or any(_same_vm(r, self.vm_name)
                                                                              for r in resources)):
                return Notice("azure", "Preempt", self._deadline(event.get("NotBefore")), str(event["EventId"]))
        return None

    def _vm_name(self) -> str:
        url = f"{self.base}/metadata/instance/compute/name?api-version=2021-02-01&format=text"
        reply = _request("GET", url, {"Metadata": "true"})
        if reply.status != 200:
            raise _unexpected("GET", url, reply)
        return reply.body.decode().strip()

    @staticmethod
    def _deadline(not_before: str | None) -> float:
        if not_before:  # RFC 1123, e.g. "Mon, 19 Sep 2016 18:29:47 GMT"
            try:
                return email.utils.parsedate_to_datetime(not_before).timestamp()
            except (TypeError, ValueError):
                pass
        return time.time() + AZURE_NOTICE_S  # empty once the event has started

    def acknowledge(self, notice: Notice) -> None:
        """Start the event now (call after the checkpoint is committed): the VM may go at once."""
        body = json.dumps({"StartRequests": [{"EventId": notice.event_id}]}).encode()
        try:
            reply = _request("POST", self.url, {"Metadata": "true", "Content-Type": "application/json"}, body)
            if reply.status != 200:
                raise _unexpected("POST", self.url, reply)
        except MetadataUnavailable as e:
            warn(f"could not acknowledge Azure event {notice.event_id} ({e}); the VM goes at its NotBefore")


def _same_vm(resource: str, vm_name: str) -> bool:
    # Azure names are case-insensitive; scale-set instances may be listed with a leading underscore
    return resource.lstrip("_").lower() == vm_name.lstrip("_").lower()


def resolve_metadata_url(configured: str | None) -> str | None:
    """The metadata base URL for this node: $RUNNER_METADATA_URL, else preemption.metadata_url, else None."""
    from_env = os.environ.get(METADATA_URL_ENV)
    url, source = (from_env, METADATA_URL_ENV) if from_env else (configured, "preemption.metadata_url")
    if url and (urlparse(url).scheme not in ("http", "https") or not urlparse(url).netloc):
        raise ConfigError(f"{source}: '{url}' is not an http(s) URL (e.g. http://127.0.0.1:8080)")
    return url or None


def detect(choice: str, metadata_url: str | None, dmi_dir: str | Path = DMI_DIR,
           poll_s: float = DEFAULT_POLL_S) -> Provider | None:
    """The provider to watch, or None. `auto` reads only local files (DMI) and, when they name no cloud,
    probes nothing but an explicitly given metadata_url; with neither it returns None without a packet."""
    if choice not in CHOICES:
        raise ConfigError(f"preemption.notice: unknown '{choice}' (one of {', '.join(CHOICES)})")
    if choice == "off":
        return None
    name = choice if choice != "auto" else _cloud_from_dmi(Path(dmi_dir))
    if name is not None:
        return _provider(name, metadata_url, poll_s)
    if metadata_url is None:
        return None
    for name in ("gcp", "aws", "azure"):
        provider = _provider(name, metadata_url, poll_s)
        if _answers(provider):
            return provider
    warn(f"preemption.notice=auto: {metadata_url} answers none of the AWS, GCP and Azure metadata protocols; "
         "watching no preemption notices (set preemption.notice to aws, gcp or azure to insist)")
    return None


def _provider(name: str, metadata_url: str | None, poll_s: float) -> Provider:
    if name == "aws":
        return AwsProvider(metadata_url or AWS_METADATA_URL)
    if name == "gcp":
        return GcpProvider(metadata_url or GCP_METADATA_URL, poll_s)
    return AzureProvider(metadata_url or AZURE_METADATA_URL)


def _answers(provider: Provider) -> bool:
    """Whether an explicitly given metadata URL speaks this provider's protocol (one quick request)."""
    try:
        if isinstance(provider, AwsProvider):
            provider._token()
        elif isinstance(provider, GcpProvider):
            provider.poll()  # the first poll reads the current value, without waiting
        else:
            reply = _request("GET", provider.url, {"Metadata": "true"})
            return reply.status == 200
    except MetadataUnavailable:
        return False
    return True


def _cloud_from_dmi(dmi_dir: Path) -> str | None:
    def read(name: str) -> str:
        try:
            return (dmi_dir / name).read_text(errors="replace").strip()
        except OSError:  # absent (containers, non-x86) or unreadable
            return ""

    strings = " ".join(read(n) for n in ("sys_vendor", "product_name", "bios_vendor", "board_vendor"))
    if "Amazon" in strings or "amazon" in read("bios_version"):  # older Xen instances: bios_version 4.11.amazon
        return "aws"
    if "Google" in strings:
        return "gcp"
    if "Microsoft Corporation" in strings and read("chassis_asset_tag") == AZURE_ASSET_TAG:
        return "azure"
    return None


class NoticeWatcher:
    """Polls `provider` on a daemon thread every poll_s (a long-polling provider waits in the request
    instead) and calls on_notice(notice) once, from that thread; then it ends. Errors are retried; the first
    one is reported, the rest are not (a metadata service that is down must not flood the log)."""

    def __init__(self, provider: Provider, on_notice: Callable[[Notice], None], poll_s: float = DEFAULT_POLL_S):
        self.provider, self.on_notice, self.poll_s = provider, on_notice, poll_s
        self.notice: Notice | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"runner-notice-{provider.name}")

    def start(self) -> NoticeWatcher:
        self._thread.start()
        return self

    def stop(self, timeout: float = HTTP_TIMEOUT_S) -> None:
        """Ask the thread to end; waits at most `timeout` (a request in flight ends by its own timeout)."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        reported = False
        while not self._stopped.is_set():
            failed = False
            try:
                notice = self.provider.poll()
            except MetadataUnavailable as e:
                notice, failed = None, True
                if not reported:
                    reported = True
                    warn(f"preemption notices: {e}; retrying every {self.poll_s:g} s (further errors are "
                         "not reported)")
            if notice is not None and not self._stopped.is_set():
                self.notice = notice
                try:
                    self.on_notice(notice)
                except Exception as e:  # the watcher must not die with a traceback in the middle of training
                    warn(f"preemption notices: handling '{notice.describe()}' failed: {e!r}")
                return
            if failed or not self.provider.long_polls:
                self._stopped.wait(self.poll_s)
