"""`make demo` and `python -m flows.pipeline` start the MLflow store and the local Ray instance while Prefect's
temporary API server starts; the flow then runs on that server. A named Prefect server or Ray cluster is not
started here (a Jobs endpoint is only joined by the stages, through Ray jobs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from flowkit import REPO, env_for

SCRIPT = """
import json, sys, time
from pathlib import Path
from prefect import flow
from prefect.server.api.server import SubprocessASGIServer
import ray
from flows._cli import start_local_services
from ulcore.config import load_config
cfg = load_config(None, [f"storage.root={sys.argv[1]}", *sys.argv[2:]])
start = time.perf_counter()
start_local_services(cfg)
started = {"ray": ray.is_initialized(), "api_running": SubprocessASGIServer().running,
           "mlflow_db": (Path(sys.argv[1]) / "mlflow.db").is_file(), "seconds": time.perf_counter() - start}
@flow
def one():
    return 1
flow_result = one(return_state=True).result() if started["api_running"] else None
print("RESULT " + json.dumps({**started, "flow": flow_result, "servers": len(SubprocessASGIServer._instances)}))
"""


def _run(tmp_path: Path, *overrides: str, api_url: str = "") -> tuple[dict, str]:
    env = env_for(tmp_path)
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "root"), *overrides], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), out.stdout + out.stderr


def test_services_start_together_and_the_flow_uses_that_api_server(tmp_path):
    result, log = _run(tmp_path)
    assert result["ray"] and result["api_running"] and result["mlflow_db"] and result["flow"] == 1
    assert result["servers"] == 1 and log.count("Starting temporary server") == 1, log[-3000:]


def test_a_named_server_and_cluster_are_not_started_locally(tmp_path):
    result, log = _run(tmp_path, "ray.address=http://127.0.0.1:9", api_url="http://127.0.0.1:9/api")
    assert not result["ray"] and not result["api_running"] and result["mlflow_db"]
    assert "Starting temporary server" not in log
