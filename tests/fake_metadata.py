"""Fake cloud metadata servers on 127.0.0.1 for the notice tests: each speaks its provider's protocol (headers
enforced, an AWS token required), answers "no notice" until the test turns the notice on, and records requests."""
from __future__ import annotations

import email.utils
import json
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

NOTICE_AT = datetime(2026, 11, 29, 15, 0, 0, tzinfo=timezone.utc)


class FakeMetadata(ThreadingHTTPServer):
    """A metadata server on 127.0.0.1; `notice` turns the provider's notice on; `requests` records
    (method, path, headers, body) of every request."""

    daemon_threads = True

    def __init__(self, handler):
        super().__init__(("127.0.0.1", 0), handler)
        self.notice = False
        self.requests: list[tuple[str, str, dict, bytes]] = []
        self.changed = threading.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def turn_on(self) -> None:
        with self.changed:
            self.notice = True
            self.changed.notify_all()


class Handler(BaseHTTPRequestHandler):
    server: FakeMetadata

    def log_message(self, *args) -> None:
        pass

    def reply(self, status: int, body: bytes | str = b"", **headers: str) -> None:
        body = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def record(self) -> bytes:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append((self.command, self.path, dict(self.headers), body))
        return body


class AwsHandler(Handler):
    """IMDSv2: PUT /latest/api/token (TTL header required) gives a token; GETs without a valid one get 401."""

    def do_PUT(self) -> None:
        self.record()
        if self.path != "/latest/api/token" or "X-aws-ec2-metadata-token-ttl-seconds" not in self.headers:
            return self.reply(400)
        token = f"token-{len(self.server.tokens)}"
        self.server.tokens.add(token)
        self.reply(200, token)

    def do_GET(self) -> None:
        self.record()
        if self.headers.get("X-aws-ec2-metadata-token") not in self.server.tokens:
            return self.reply(401)
        if self.server.failures > 0:
            self.server.failures -= 1
            return self.reply(500)
        if self.path != "/latest/meta-data/spot/instance-action" or not self.server.notice:
            return self.reply(404)
        when = self.server.notice_time or NOTICE_AT
        self.reply(200, json.dumps({"action": "terminate", "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}))


class GcpHandler(Handler):
    """instance/preempted: 403 without Metadata-Flavor; wait_for_change blocks until a change or timeout_sec,
    and returns at once when last_etag is not the current one."""

    def do_GET(self) -> None:
        self.record()
        url = urlparse(self.path)
        if self.headers.get("Metadata-Flavor") != "Google":
            return self.reply(403)
        if url.path != "/computeMetadata/v1/instance/preempted":
            return self.reply(404)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        with self.server.changed:
            if query.get("wait_for_change") == "true" and query.get("last_etag") == self.etag():
                self.server.changed.wait(float(query.get("timeout_sec", 60)))
            self.reply(200, "TRUE" if self.server.notice else "FALSE", ETag=self.etag(), Metadata_Flavor="Google")

    def etag(self) -> str:
        return "etag-on" if self.server.notice else "etag-off"


class AzureHandler(Handler):
    """Scheduled Events: 400 without `Metadata: true`; a Preempt event for this VM once on (and one for another
    VM always); POSTs are recorded as acknowledgements."""

    EVENT = {"EventId": "C7061BAC-AFDC-4513-B24B-AA5F13A16123", "EventType": "Preempt", "ResourceType":
             "VirtualMachine", "Resources": ["vm-a"], "EventStatus": "Scheduled",
             "NotBefore": email.utils.format_datetime(NOTICE_AT, usegmt=True), "Description": "", "EventSource":
             "Platform", "DurationInSeconds": -1}
    OTHER_VM = {**EVENT, "EventId": "0000-other", "Resources": ["vm-b"]}

    def do_GET(self) -> None:
        self.record()
        url = urlparse(self.path)
        if self.headers.get("Metadata") != "true":
            return self.reply(400)
        if url.path == "/metadata/instance/compute/name":
            return self.reply(200, "vm-a")
        if url.path != "/metadata/scheduledevents" or "api-version" not in parse_qs(url.query):
            return self.reply(404)
        event = self.EVENT
        if self.server.notice_time is not None:
            event = {**event, "NotBefore": email.utils.format_datetime(self.server.notice_time, usegmt=True)}
        events = [self.OTHER_VM] + ([event] if self.server.notice else [])
        self.reply(200, json.dumps({"DocumentIncarnation": 1 + self.server.notice, "Events": events}))

    def do_POST(self) -> None:
        body = self.record()
        if self.headers.get("Metadata") != "true" or urlparse(self.path).path != "/metadata/scheduledevents":
            return self.reply(400)
        self.server.acknowledged.append(json.loads(body))
        self.reply(200)


def serve(handler) -> FakeMetadata:
    server = FakeMetadata(handler)
    server.tokens, server.failures, server.acknowledged, server.notice_time = set(), 0, [], None
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server
