"""Cloud preemption notices (README, "Preemption and fault tolerance"): provider detection, each provider's
protocol against a fake metadata server on 127.0.0.1 (headers enforced, AWS token required, no notice until the
test turns it on), the watcher thread, and `auto` sending no packet off-cloud. Nothing here leaves 127.0.0.1."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from runner import notices
from runner.errors import ConfigError
from runner.notices import AwsProvider, AzureProvider, GcpProvider, Notice, NoticeWatcher, detect

from fake_metadata import NOTICE_AT, AwsHandler, AzureHandler, GcpHandler, serve

@pytest.fixture
def aws():
    server = serve(AwsHandler)
    yield server
    server.shutdown()


@pytest.fixture
def gcp():
    server = serve(GcpHandler)
    yield server
    server.turn_on()  # release a long-poll still waiting
    server.shutdown()


@pytest.fixture
def azure():
    server = serve(AzureHandler)
    yield server
    server.shutdown()


def dmi(tmp_path: Path, **strings: str) -> Path:
    for name, value in strings.items():
        (tmp_path / name).write_text(value + "\n")
    return tmp_path


UNUSED = "http://127.0.0.1:9"  # a base URL for detection tests, which send nothing


@pytest.mark.parametrize("strings, expected", [
    ({"sys_vendor": "Amazon EC2", "product_name": "g5.xlarge", "bios_vendor": "Amazon EC2"}, AwsProvider),
    ({"sys_vendor": "Xen", "product_name": "HVM domU", "bios_version": "4.11.amazon"}, AwsProvider),
    ({"sys_vendor": "Google", "product_name": "Google Compute Engine"}, GcpProvider),
    ({"sys_vendor": "Microsoft Corporation", "product_name": "Virtual Machine",
      "chassis_asset_tag": notices.AZURE_ASSET_TAG}, AzureProvider),
    ({"sys_vendor": "Microsoft Corporation", "product_name": "Virtual Machine"}, None),  # a Hyper-V VM
    ({"sys_vendor": "Dell Inc.", "product_name": "XPS 15", "board_vendor": "Dell Inc."}, None),
    ({}, None),
], ids=["aws", "aws-xen", "gcp", "azure", "hyperv-not-azure", "laptop", "no-dmi"])
def test_auto_detects_the_cloud_from_dmi(tmp_path, strings, expected):
    provider = detect("auto", UNUSED, dmi_dir=dmi(tmp_path, **strings))
    if expected is None:
        assert provider is None
    else:
        assert isinstance(provider, expected) and provider.base == UNUSED


def test_explicit_choice_and_off_ignore_dmi(tmp_path):
    amazon = dmi(tmp_path, sys_vendor="Amazon EC2")
    assert detect("off", UNUSED, dmi_dir=amazon) is None
    assert isinstance(detect("gcp", UNUSED, dmi_dir=amazon), GcpProvider)
    with pytest.raises(ConfigError, match="preemption.notice: unknown 'spot'"):
        detect("spot", None, dmi_dir=amazon)


def test_metadata_url_from_the_environment_wins(monkeypatch):
    monkeypatch.setenv(notices.METADATA_URL_ENV, "http://127.0.0.1:8080")
    assert notices.resolve_metadata_url("http://127.0.0.1:9") == "http://127.0.0.1:8080"
    monkeypatch.setenv(notices.METADATA_URL_ENV, "127.0.0.1:8080")
    with pytest.raises(ConfigError, match="RUNNER_METADATA_URL: '127.0.0.1:8080' is not an http"):
        notices.resolve_metadata_url(None)
    monkeypatch.delenv(notices.METADATA_URL_ENV)
    assert notices.resolve_metadata_url(None) is None


def test_auto_with_an_explicit_url_finds_the_protocol_there(tmp_path, aws, gcp, azure):
    off_cloud = tmp_path  # no DMI strings
    assert isinstance(detect("auto", aws.url, dmi_dir=off_cloud), AwsProvider)
    assert isinstance(detect("auto", gcp.url, dmi_dir=off_cloud), GcpProvider)
    assert isinstance(detect("auto", azure.url, dmi_dir=off_cloud), AzureProvider)


def test_auto_off_cloud_sends_no_packet(monkeypatch, capsys):
    attempts = []

    def refuse(*args, **kwargs):  # records the attempt; nothing is sent, even if detection were wrong
        attempts.append(args)
        raise ConnectionRefusedError("no packet may leave this test")

    for name in ("connect", "connect_ex", "sendto", "sendmsg"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)  # a DNS query is a packet too
    monkeypatch.delenv(notices.METADATA_URL_ENV, raising=False)
    dmi_dir = Path(notices.DMI_DIR)
    if notices._cloud_from_dmi(dmi_dir) is not None:
        pytest.skip(f"this machine's DMI ({dmi_dir}) names a cloud")
    assert detect("auto", notices.resolve_metadata_url(None)) is None
    assert attempts == []
    assert capsys.readouterr().err == ""  # no error, no warning


def test_aws_notice_after_404_with_the_instance_action_time(aws):
    provider = AwsProvider(aws.url)
    assert provider.poll() is None
    aws.turn_on()
    notice = provider.poll()
    assert notice == Notice("aws", "terminate", NOTICE_AT.timestamp())
    assert [m for m, *_ in aws.requests].count("PUT") == 1  # one token serves every poll
    assert notice.describe().startswith("aws preemption notice: terminate, the VM goes at 20")


def test_aws_fetches_a_new_token_after_401(aws):
    provider = AwsProvider(aws.url)
    assert provider.poll() is None
    aws.tokens.clear()  # the metadata service forgot every token (e.g. it restarted)
    aws.turn_on()
    assert provider.poll() == Notice("aws", "terminate", NOTICE_AT.timestamp())
    assert [m for m, *_ in aws.requests] == ["PUT", "GET", "GET", "PUT", "GET"]


def test_gcp_notice_is_long_polled_with_the_30s_window(gcp):
    provider = GcpProvider(gcp.url, poll_s=5)
    assert provider.poll() is None  # reads the current value
    threading.Timer(0.3, gcp.turn_on).start()
    start = time.time()
    notice = provider.poll()  # waits in the request; the change ends it at once
    assert notice is not None and notice.provider == "gcp"
    assert time.time() - start < 3
    assert start + notices.GCP_NOTICE_S <= notice.deadline <= time.time() + notices.GCP_NOTICE_S
    query = parse_qs(urlparse(gcp.requests[-1][1]).query)
    assert query["wait_for_change"] == ["true"] and query["last_etag"] == ["etag-off"]


def test_gcp_sees_a_notice_already_set_at_start(gcp):
    gcp.turn_on()
    assert GcpProvider(gcp.url, poll_s=5).poll() is not None


def test_azure_preempt_event_for_this_vm_and_acknowledgement(azure):
    provider = AzureProvider(azure.url)
    assert provider.poll() is None  # another VM's Preempt event does not stop this one
    azure.turn_on()
    notice = provider.poll()
    assert notice == Notice("azure", "Preempt", NOTICE_AT.timestamp(), AzureHandler.EVENT["EventId"])
    assert azure.acknowledged == []
    provider.acknowledge(notice)
    assert azure.acknowledged == [{"StartRequests": [{"EventId": AzureHandler.EVENT["EventId"]}]}]


def test_watcher_calls_on_notice_once_off_the_training_thread(aws):
    seen: list[tuple[Notice, threading.Thread]] = []
    called = threading.Event()

    def on_notice(notice: Notice) -> None:
        seen.append((notice, threading.current_thread()))
        called.set()

    poll_s = 0.2
    watcher = NoticeWatcher(AwsProvider(aws.url), on_notice, poll_s).start()
    try:
        time.sleep(2 * poll_s)
        assert not called.is_set()
        aws.turn_on()
        start = time.monotonic()
        assert called.wait(5)
        assert time.monotonic() - start < 2 * poll_s + 0.6  # slack for a loaded machine
        time.sleep(3 * poll_s)
    finally:
        watcher.stop()
    assert [notice for notice, _ in seen] == [Notice("aws", "terminate", NOTICE_AT.timestamp())]
    assert seen[0][1] is not threading.main_thread() and seen[0][1].daemon
    assert watcher.notice == seen[0][0]


def test_watcher_reports_an_error_once_and_keeps_polling(aws, capsys):
    aws.failures = 3
    aws.turn_on()
    called = threading.Event()
    watcher = NoticeWatcher(AwsProvider(aws.url), lambda notice: called.set(), poll_s=0.1).start()
    try:
        assert called.wait(5)
    finally:
        watcher.stop()
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1 and "HTTP 500" in err and "/spot/instance-action" in err


def test_watcher_stop_ends_a_watcher_without_a_notice(gcp):
    seen = []
    watcher = NoticeWatcher(GcpProvider(gcp.url, poll_s=5), seen.append, poll_s=5).start()
    time.sleep(0.3)  # the watcher now waits in a long-poll
    watcher.stop(timeout=0)
    gcp.turn_on()  # ends the long-poll in flight with the notice; the stopped watcher must not act on it
    watcher._thread.join(5)
    assert not watcher._thread.is_alive() and seen == [] and watcher.notice is None
