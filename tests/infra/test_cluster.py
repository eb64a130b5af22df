"""`make cluster`'s script on this machine: a Ray head and two worker nodes (separate `ray start` processes, own
temp dirs and working directories), a moto S3 endpoint, PostgreSQL behind an MLflow server with artefacts on S3 —
every socket on loopback, and `down` leaves nothing listening and no process behind."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")


def _listened(port: int) -> bool:
    return any(c.laddr.port == port for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN)


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return not _listened(port)


def _ports() -> dict[str, str]:
    """Six service ports and a block of 300 node ports, all free now."""
    for _ in range(50):
        base = random.randrange(30000, 39000, 100)
        singles = [base + 300 + i for i in range(6)]
        if all(_free(p) for p in [*range(base, base + 300), *singles]):
            names = ("RAY_PORT", "RAY_DASHBOARD_PORT", "RAY_CLIENT_PORT", "S3_PORT", "PG_PORT", "MLFLOW_PORT")
            return {"RAY_NODE_PORT_BASE": str(base), **{n: str(p) for n, p in zip(names, singles)}}
    raise RuntimeError("no free block of ports for the cluster")


def _cluster(env: dict[str, str], action: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "infra/cluster.sh", action], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _group_processes(folder: Path) -> list[psutil.Process]:
    """Every live process in the sessions of the recorded pids, plus any whose working directory is the cluster's."""
    sessions = {int(p.read_text()) for p in folder.glob("*.pid")}
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) in sessions or str(folder) in (proc.cwd() or ""):
                found.append(proc)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return found


def _listening(procs: list[psutil.Process]) -> list[tuple[str, int, str]]:
    out = []
    for proc in procs:
        try:
            out += [(c.laddr.ip, c.laddr.port, proc.name()) for c in proc.net_connections("tcp")
                    if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
    return out


@pytest.fixture(scope="module")
def cluster():
    folder = Path(tempfile.mkdtemp(prefix="ulc-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    folder.chmod(0o755)  # PostgreSQL runs as its own account and must enter it
    ports = _ports()
    env = {**os.environ, **ports, "CLUSTER_DIR": str(folder), "BIN": str(BIN), "S3_BUCKET": "ul-test"}
    env.pop("RAY_ADDRESS", None)
    try:
        up = _cluster(env, "up", timeout=420)
        logs = "\n".join(f"--- {log.name}\n{log.read_text()[-1500:]}" for log in sorted(folder.glob("*.log")))
        assert up.returncode == 0, f"{up.stdout[-2000:]}\n{up.stderr[-2000:]}\n{logs}"
        yield folder, env, ports
    finally:
        _cluster(env, "down", timeout=180)
        shutil.rmtree(folder, ignore_errors=True)


def test_three_ray_nodes_each_in_its_own_folder(cluster):
    folder, _env, ports = cluster
    url = f"http://127.0.0.1:{ports['RAY_DASHBOARD_PORT']}/nodes?view=summary"
    nodes = json.load(urllib.request.urlopen(url, timeout=30))["data"]["summary"]
    alive = [n for n in nodes if n["raylet"]["state"] == "ALIVE"]
    assert len(alive) == 3
    assert {n["raylet"]["nodeManagerAddress"] for n in alive} == {"127.0.0.1"}
    cpus = sorted(n["raylet"].get("resourcesTotal", {}).get("CPU", 0) for n in alive)
    assert cpus == [0, 1, 1], "the head schedules only; each worker node has one CPU"
    for name in ("head", "worker1", "worker2"):
        assert any((folder / name / "tmp").glob("session_*")), f"{name} has its own Ray temp dir"


def test_every_socket_listens_on_loopback(cluster):
    folder, _env, ports = cluster
    listening = _listening(_group_processes(folder))
    assert {int(ports[k]) for k in ("RAY_PORT", "RAY_DASHBOARD_PORT", "S3_PORT", "PG_PORT", "MLFLOW_PORT")} <= {
        port for _ip, port, _name in listening}
    outside = [entry for entry in listening if entry[0] not in LOOPBACK]
    assert not outside, f"listening beyond loopback: {outside}"


def test_env_file_gives_the_documented_command_its_flags(cluster):
    folder, _env, ports = cluster
    text = (folder / "env").read_text()
    assert f"RAY_ADDRESS=http://127.0.0.1:{ports['RAY_DASHBOARD_PORT']}" in text
    assert f"MLFLOW_TRACKING_URI=http://127.0.0.1:{ports['MLFLOW_PORT']}" in text
    flags = next(line for line in text.splitlines() if "UL_CLUSTER_ARGS=" in line)
    for flag in ("storage.root=s3://ul-test/", f"ray.address=http://127.0.0.1:{ports['RAY_DASHBOARD_PORT']}",
                 f"tracking.uri=http://127.0.0.1:{ports['MLFLOW_PORT']}",
                 f"storage.s3_endpoint=http://127.0.0.1:{ports['S3_PORT']}"):
        assert flag in flags
    assert oct((folder / "env").stat().st_mode & 0o777) == "0o600"
    assert (folder / "pg-secret").read_text().strip() not in text, "the database password stays out of the env file"


def test_mlflow_server_keeps_runs_in_postgres_and_artefacts_on_s3(cluster, tmp_path):
    import boto3
    from mlflow import MlflowClient

    folder, env, ports = cluster
    client = MlflowClient(f"http://127.0.0.1:{ports['MLFLOW_PORT']}")
    run = client.create_run(client.create_experiment("cluster-test"))
    client.log_metric(run.info.run_id, "psnr", 21.5)
    (tmp_path / "grid.txt").write_text("samples")
    client.log_artifact(run.info.run_id, str(tmp_path / "grid.txt"))
    assert client.get_run(run.info.run_id).data.metrics == {"psnr": 21.5}

    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{ports['S3_PORT']}", region_name="us-east-1",
                      aws_access_key_id="x", aws_secret_access_key="x")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ul-test").get("Contents", [])]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/grid.txt") for k in keys), keys

    pg_bin = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
    as_pg = ["runuser", "-u", "ulpg", "--"] if os.getuid() == 0 else []
    rows = subprocess.run([*as_pg, str(pg_bin / "psql"), "-h", str(folder / "pg-sock"), "-p", ports["PG_PORT"],
                           "-U", "ul", "-d", "mlflow", "-tAc", "SELECT run_uuid FROM runs"],
                          capture_output=True, text=True, timeout=30, check=True).stdout.split()
    assert run.info.run_id in rows


def test_down_leaves_nothing_running(cluster):
    folder, env, ports = cluster
    before = _group_processes(folder)
    assert before
    down = _cluster(env, "down", timeout=180)
    assert down.returncode == 0, down.stderr
    assert not [p for p in before if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not _group_processes(folder)
    assert not [k for k in ("RAY_PORT", "RAY_DASHBOARD_PORT", "S3_PORT", "PG_PORT", "MLFLOW_PORT")
                if _listened(int(ports[k]))]
    assert not list(folder.glob("*.pid"))
