"""Shared test fixtures: a real S3 HTTP endpoint (moto in server mode) on 127.0.0.1.

``moto_endpoint`` starts one server per test session; ``s3_server`` points the AWS variables of a
single test at it (monkeypatched, so nothing leaks into other tests) and yields its URL;
``s3_bucket`` creates a fresh bucket there and yields its name. Use them as::

    def test_upload(s3_bucket):
        storage.atomic_write(f"s3://{s3_bucket}/key") ...
"""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture(scope="session")
def moto_endpoint():
    """URL of a moto S3 server on loopback, started once for the session and stopped after it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_server(moto_endpoint, monkeypatch, tmp_path):
    """The moto endpoint, with this test's AWS settings pointing at it and nothing else."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # Settings a developer machine may carry must not redirect the test to a real account or proxy.
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL_S3", "HTTP_PROXY",
                 "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    yield moto_endpoint


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the moto server."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    yield name
