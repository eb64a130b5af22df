"""Which Ray a stage uses: its own local instance unless a cluster is named, whatever else runs on the machine.

A real `ray start --head` cluster runs beside the test (in its own RAY_TMPDIR, so it writes Ray's "current
cluster" file there without touching other Ray users of the machine), then is killed to leave a dead one behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ("import ray; from ulcore.config import RayConfig; from ulcore.runtime import ensure_ray; "
          "ensure_ray(RayConfig(num_cpus=1, address={address!r})); "
          "print('GCS', ray.get_runtime_context().gcs_address, flush=True); "
          "import os; print('NICE', ray.get(ray.remote(lambda: os.nice(0)).remote()), os.nice(0), flush=True); "
          "ray.shutdown()")


def _driver(env: dict[str, str], address: str = "", timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DRIVER.format(address=address)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _start_head(env: dict[str, str], current: Path) -> subprocess.Popen:
    """`ray start --head --block`; tried three times, as its raylet gets a fixed 30 s to register on a busy machine."""
    for _ in range(3):
        current.unlink(missing_ok=True)
        head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                                 f"--port={free_port()}", "--num-cpus=1", "--include-dashboard=false",
                                 f"--dashboard-agent-listen-port={free_port()}"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while head.poll() is None and time.monotonic() < deadline:
            if current.exists():
                return head
            time.sleep(0.5)
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
    raise AssertionError("ray start --head did not come up in three tries")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_local_runs_ignore_other_and_dead_clusters_and_named_ones_fail_fast():
    tmp = tempfile.mkdtemp(prefix="ulray", dir="/tmp")  # short: Ray's socket paths live below it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_TMPDIR=tmp, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    current = Path(tmp, "ray", "ray_current_cluster")
    head = _start_head(env, current)
    try:
        head_address = current.read_text().strip()

        live = _driver(env)
        assert live.returncode == 0, live.stderr[-3000:]
        assert "[ray] started a local Ray instance" in live.stdout
        assert f"GCS {head_address}" not in live.stdout  # not hijacked by the machine's `ray start` cluster
        assert "Found multiple active Ray instances" not in live.stdout + live.stderr
        worker_nice, driver_nice = live.stdout.split("NICE ", 1)[1].split()[:2]
        assert worker_nice == driver_nice  # not Ray's nice 15: other processes would preempt training (runtime.py)

        # RAY_ADDRESS is for `ray job` commands (make cluster's env file sets it): a stage joins only ray.address
        beside = _driver({**env, "RAY_ADDRESS": head_address})
        assert beside.returncode == 0, beside.stderr[-3000:]
        assert "[ray] started a local Ray instance" in beside.stdout and f"GCS {head_address}" not in beside.stdout

        os.killpg(head.pid, signal.SIGKILL)  # a crash: the current-cluster file stays, pointing at nothing
        head.wait(timeout=30)
        time.sleep(1)
        assert current.read_text().strip() == head_address
        dead = _driver(env)
        assert dead.returncode == 0, dead.stderr[-3000:]
        assert "[ray] started a local Ray instance" in dead.stdout

        started = time.monotonic()
        named = _driver(env, address=head_address, timeout=60)
        assert named.returncode != 0 and time.monotonic() - started < 45
        assert f"the Ray cluster at {head_address} (from ray.address) is not reachable" in named.stderr
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


def test_driver_settings_are_ones_ray_train_hands_to_its_controller_and_workers():
    """DRIVER_ENV works only through Ray Train's list of variables it copies from the driver (the poll interval, the
    print patch): a Ray upgrade that renames one would make the setting silently do nothing."""
    from ray.train.v2._internal.constants import DEFAULT_HEALTH_CHECK_INTERVAL_S, ENV_VARS_TO_PROPAGATE

    from ulcore.runtime import DRIVER_ENV

    assert set(DRIVER_ENV) <= ENV_VARS_TO_PROPAGATE, set(DRIVER_ENV) - ENV_VARS_TO_PROPAGATE
    assert 0 < float(DRIVER_ENV["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]) < DEFAULT_HEALTH_CHECK_INTERVAL_S


def test_a_port_block_is_free_and_outside_the_ephemeral_range(tmp_path, monkeypatch):
    """Ports the kernel may give an outgoing connection are avoided; a machine whose range leaves no room still
    gets a free block."""
    from ulcore import runtime

    base = runtime.free_port_block(306)
    low, high = runtime.ephemeral_port_range()
    assert base + 306 <= low or base > high
    for port in range(base, base + 306):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    whole = tmp_path / "range"
    whole.write_text("1024\t65535\n")
    assert runtime.ephemeral_port_range(whole) == (1024, 65535)
    assert runtime.ephemeral_port_range(tmp_path / "missing") == (32768, 60999)
    monkeypatch.setattr(runtime, "ephemeral_port_range", lambda: (1024, 65535))
    assert 10000 <= runtime.free_port_block(10) <= 65526
