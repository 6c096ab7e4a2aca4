"""Shared fixtures: a real S3-protocol server (moto) and a real MLflow tracking server on 127.0.0.1, and `store_url`
over every backend."""

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import pytest
import torch

from helpers import free_port


def _die_with_parent() -> None:
    # Linux: the server gets SIGTERM if pytest itself dies (even by SIGKILL), so it never outlives us.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _wait_until_up(endpoint: str, proc: subprocess.Popen, log, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read().decode()[-2000:]}")
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return
        except urllib.error.HTTPError:  # any HTTP answer means it is serving
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not answer on {endpoint} within {timeout}s")


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of a moto S3 server bound to 127.0.0.1 only; stopped at session end."""
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
        try:
            endpoint = f"http://127.0.0.1:{port}"
            _wait_until_up(endpoint, proc, log)
            yield endpoint
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def s3_store_url(s3_server, monkeypatch):
    """(url, storage_options) of an empty prefix in a fresh bucket on the moto server."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # Keep a developer's ~/.aws out of the tests.
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    import s3fs

    options = {"endpoint_url": s3_server, "skip_instance_cache": True}
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    s3fs.S3FileSystem(**options).mkdir(bucket)
    return f"s3://{bucket}/ckpt", options


@pytest.fixture(params=["local", "memory", "s3"])
def store_url(request, tmp_path):
    """(url, storage_options) of an empty checkpoint directory on each storage backend."""
    if request.param == "local":
        yield str(tmp_path / "ckpt"), {}
    elif request.param == "memory":
        import fsspec

        path = f"/test-{uuid.uuid4().hex}"
        yield f"memory://{path.lstrip('/')}", {}
        # The memory filesystem is process-global: don't leak into later tests.
        with contextlib.suppress(FileNotFoundError):
            fsspec.filesystem("memory").rm(path, recursive=True)
    else:
        yield request.getfixturevalue("s3_store_url")


@pytest.fixture
def one_thread():
    """In-process training on one intra-op thread: on a shared 2-core machine, more threads oversubscribe
    the cores and a tiny job runs several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """Tracking URI of a real `mlflow server` (sqlite backend store, artifacts in a folder) on 127.0.0.1 only;
    stopped with the module."""
    pytest.importorskip("mlflow", reason="pip install 'runner-train[mlflow]'")
    folder, port = tmp_path_factory.mktemp("mlflow"), free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--artifacts-destination", str(folder / "art")]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                                start_new_session=True)  # its workers go with it (killpg)
        try:
            uri = f"http://127.0.0.1:{port}"
            _wait_until_up(f"{uri}/health", proc, log, timeout=90)
            from mlflow.tracking import MlflowClient

            MlflowClient(uri).search_experiments()  # the server's first API call takes seconds: not in a test's
            yield uri
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
