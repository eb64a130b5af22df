"""Shared fixtures: a real S3-compatible HTTP endpoint (moto server) on 127.0.0.1 for the whole session, and each
test's MLflow and Prefect lineage variables as the session had them."""

from __future__ import annotations

import os
import socket
import uuid
import warnings

import pytest

S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


# Where runs are logged and whose children they are: a stage run exports these while it is open, and a later test
# (or the subprocess it starts) that found one left over would log to another test's store.
LINEAGE_ENV = ("MLFLOW_TRACKING_URI", "UL_PARENT_RUN_ID", "UL_PREFECT_FLOW_RUN_ID", "UL_PREFECT_ROOT_FLOW_RUN_ID")


@pytest.fixture(autouse=True)
def lineage_env_as_it_was(request):
    """Restore the lineage variables after each test, and name a test that left one changed."""
    before = {key: os.environ.get(key) for key in LINEAGE_ENV}
    yield
    changed = {key: os.environ.get(key) for key in LINEAGE_ENV if os.environ.get(key) != before[key]}
    for key in changed:
        if before[key] is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before[key]
    if changed:
        warnings.warn(f"{request.node.nodeid} left {changed} in the environment (restored)", stacklevel=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """Start moto's S3 server on a free loopback port; AWS_ENDPOINT_URL and fake keys point boto3 at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=url)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield url
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket: yields `s3://<bucket>`."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    yield f"s3://{name}"
