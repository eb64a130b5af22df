"""A lost S3 endpoint ends the shard stage within `storage.unreachable_after_s`, with one message naming it.

A real moto server runs as its own process on 127.0.0.1 and is killed (SIGKILL) once the first shard is written;
the stage must then fail in bounded time instead of retrying every shard through botocore and Ray.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from shard_fixtures import image_cfg
from tests.conftest import S3_ENV, free_port
from ulcore import storage
from ulcore.data.sharding import run_shard

BUDGET_S = 3.0  # storage.unreachable_after_s for the test: the bound the stage must keep
SLACK_S = 30.0  # cancelling Ray tasks and the driver's own last request, on a loaded 2-core machine


def _start_moto(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "moto server did not start"
            time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_endpoint_fails_the_stage_in_bounded_time(ray_session, imagenet_tree, monkeypatch):
    import boto3

    raw, _ = imagenet_tree
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)  # run_shard points the process here; restored after the test
    monkeypatch.setenv(storage.UNREACHABLE_ENV, str(BUDGET_S))
    server = _start_moto(port)
    killed_at: list[float] = []
    try:
        bucket = f"lost-{uuid.uuid4().hex[:8]}"
        s3 = boto3.client("s3", endpoint_url=url)
        s3.create_bucket(Bucket=bucket)
        cfg = image_cfg(str(raw), f"s3://{bucket}/run", "shard.samples_per_shard=1", "shard.max_parallel=1",
                        f"storage.s3_endpoint={url}", f"storage.unreachable_after_s={BUDGET_S}")

        def kill_after_first_shard() -> None:
            while server.poll() is None:
                listing = s3.list_objects_v2(Bucket=bucket, Prefix="run/data/shards/")
                if any(o["Key"].endswith(".stats.json") for o in listing.get("Contents", [])):
                    os.killpg(server.pid, signal.SIGKILL)
                    killed_at.append(time.monotonic())
                    return
                time.sleep(0.05)

        watcher = threading.Thread(target=kill_after_first_shard, daemon=True)
        watcher.start()
        with pytest.raises(storage.StorageUnreachable) as info:
            run_shard(cfg)
        failed_at = time.monotonic()
        watcher.join(timeout=10)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    assert killed_at, "the stage ended before the first shard was written"
    assert failed_at - killed_at[0] < BUDGET_S + SLACK_S, f"failed {failed_at - killed_at[0]:.0f} s after the kill"
    message = str(info.value)
    assert url in message and "storage.unreachable_after_s" in message and "unreachable" in message
    assert "Traceback" not in message  # one message, not a Ray task traceback
