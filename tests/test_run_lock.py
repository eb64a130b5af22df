"""One run of a stage per storage root: real processes hold the lock, are killed, and a rerun is not blocked."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ulcore.run_lock import StageLocked, stage_lock

ROOT = Path(__file__).resolve().parents[1]
HOLDER = ("import sys, time; from ulcore.run_lock import stage_lock\n"
          "with stage_lock(sys.argv[1], 'stage1', lease_s=float(sys.argv[2])):\n"
          "    print('held', flush=True); time.sleep(600)")


def _holder(root: str, lease_s: float = 60.0) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, root, str(lease_s)], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _refused(root: str, holder: subprocess.Popen) -> str:
    started = time.monotonic()
    with pytest.raises(StageLocked) as info:
        with stage_lock(root, "stage1"):
            pass
    assert time.monotonic() - started < 5  # refused at once, not after a wait
    message = str(info.value)
    assert f"host {socket.gethostname()}, pid {holder.pid}, started 20" in message and "stage1" in message
    return message


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_local_lock_refuses_a_second_run_and_a_dead_owner_does_not_block(tmp_path):
    holder = _holder(str(tmp_path))
    try:
        _refused(str(tmp_path), holder)
        with stage_lock(str(tmp_path), "encode"):  # other stages are independent
            pass
    finally:
        _kill(holder)
    with stage_lock(str(tmp_path), "stage1"):  # the kernel dropped the dead owner's lock
        assert f'"pid": {os.getpid()}' in (tmp_path / "locks" / "stage1.lock").read_text()


def test_flow_task_refuses_while_another_run_holds_the_stage(tmp_path):
    from flows._common import run_stage_task

    holder = _holder(str(tmp_path))
    try:
        with pytest.raises(StageLocked, match=f"pid {holder.pid}"):
            run_stage_task.fn("stage1", str(ROOT / "params.yaml"), [f"storage.root={tmp_path}"])
    finally:
        _kill(holder)
    assert not (tmp_path / "mlflow.db").exists()  # refused before touching anything


@pytest.mark.slow
def test_s3_lock_is_a_renewed_lease_taken_over_after_its_owner_dies(s3_bucket, capsys):
    root = s3_bucket + "/run"
    holder = _holder(root, lease_s=2.0)
    try:
        _refused(root, holder)
        time.sleep(3.0)  # past one lease: the heartbeat renewed it
        _refused(root, holder)
    finally:
        _kill(holder)
    time.sleep(2.5)  # the dead owner's lease runs out
    with stage_lock(root, "stage1"):
        assert "took over the stale lock" in capsys.readouterr().out
        with pytest.raises(StageLocked):
            with stage_lock(root, "stage1"):
                pass
    with stage_lock(root, "stage1"):  # released on exit
        pass
