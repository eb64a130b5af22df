"""`infra/stack.sh down` also ends the flow runs its worker started (each in a session of its own, so stopping the
worker's process group misses them) and nothing of another stack."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _flow_run_like(api_url: str) -> subprocess.Popen:
    """A process shaped like a flow run of the stack at `api_url`: its own session, the worker's variables."""
    env = dict(os.environ, PREFECT_API_URL=api_url, PREFECT__FLOW_RUN_ID="0b9f0c5e-0000-4000-8000-000000000000")
    return subprocess.Popen(["sleep", "300"], env=env, start_new_session=True)


def test_down_stops_the_stacks_flow_runs_and_leaves_other_stacks_alone(tmp_path):
    ours, theirs = _flow_run_like("http://127.0.0.1:47111/api"), _flow_run_like("http://127.0.0.1:47112/api")
    try:
        env = dict(os.environ, STACK_DIR=str(tmp_path / "stack"), PREFECT_PORT="47111", MLFLOW_PORT="47113")
        out = subprocess.run(["bash", "infra/stack.sh", "down"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        assert f"stopping flow-run processes still running: {ours.pid}" in out.stdout, out.stdout
        deadline = time.monotonic() + 10
        while ours.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ours.poll() is not None, "the stack's flow run survived stack.sh down"
        assert theirs.poll() is None, "stack.sh down stopped another stack's flow run"
    finally:
        for proc in (ours, theirs):
            proc.kill()
            proc.wait(timeout=10)
