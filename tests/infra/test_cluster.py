"""`make cluster`'s script on this machine: a Ray head and two worker nodes (separate `ray start` processes, own
temp dirs and working directories), a moto S3 endpoint, PostgreSQL behind an MLflow server with artefacts on S3 —
every socket on loopback, and `down` leaves nothing listening and no process behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from ulcore.runtime import free_port_block

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")


def _listened(port: int) -> bool:
    return any(c.laddr.port == port for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN)


def _ports() -> dict[str, str]:
    """Six service ports and a block of 300 node ports, all free now and outside the ephemeral range."""
    base = free_port_block(306)
    names = ("RAY_PORT", "RAY_DASHBOARD_PORT", "RAY_CLIENT_PORT", "S3_PORT", "PG_PORT", "MLFLOW_PORT")
    return {"RAY_NODE_PORT_BASE": str(base), **{n: str(base + 300 + i) for i, n in enumerate(names)}}


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


# The driver's own secret: distinct from the nodes' (set by infra/cluster.sh), so finding it anywhere on the cluster
# side would mean it travelled.
DRIVER_SECRET = "driver-only-secret-7f3c9a"


def _cluster_env(folder: Path) -> dict[str, str]:
    """The variables `.cluster/env` exports, as a user gets them with `source .cluster/env`."""
    out = subprocess.run(["bash", "-c", f"source {folder / 'env'} && env -0"], capture_output=True, timeout=30,
                         check=True).stdout.decode()
    return dict(item.split("=", 1) for item in out.split("\0") if "=" in item)


def _driver_env(folder: Path, home: Path) -> dict[str, str]:
    env = {**os.environ, **_cluster_env(folder), "PREFECT_HOME": str(home / "prefect"),
           "PREFECT_LOGGING_LEVEL": "INFO", "AWS_SECRET_ACCESS_KEY": DRIVER_SECRET, "PYTHONPATH": str(REPO)}
    env.pop("RAY_API_SERVER_ADDRESS", None)
    return env


def _node_of(log: str, stage: str) -> dict[int, str]:
    """rank -> Ray node id, from the workers' start-up lines in a job's log."""
    return {int(rank): node for rank, node in re.findall(rf"\[{stage}\] rank (\d+)/\d+ on Ray node ([0-9a-f]+)", log)}


def _alive_nodes(ports: dict[str, str]) -> dict[str, bool]:
    """node id -> is the head, for every live node."""
    from ulcore.jobs import live_nodes

    return {n.node_id: bool(n.is_head_node) for n in live_nodes(f"http://127.0.0.1:{ports['RAY_DASHBOARD_PORT']}")}


def test_tiny_pipeline_runs_across_the_cluster_with_s3_and_mlflow_server(cluster, tmp_path):
    """The documented command: every stage a Ray job, stage 1's two workers on the two worker nodes, all outputs
    on S3, runs and models in the MLflow server, nothing in the driver's folder, the driver's secret nowhere."""
    import boto3
    from mlflow import MlflowClient
    from tests.train.smoke import SMOKE
    from ulcore import layout
    from ulcore.jobs import client as jobs_client

    folder, _env, ports = cluster
    driver_cwd = tmp_path / "driver"
    driver_cwd.mkdir()
    env = _driver_env(folder, tmp_path)
    flags = env["UL_CLUSTER_ARGS"].split() + [a for o in SMOKE for a in ("--set", o)]
    run = subprocess.run([sys.executable, "-m", "flows.pipeline", "--params", str(REPO / "params.yaml"), *flags],
                         cwd=driver_cwd, env=env, capture_output=True, text=True, timeout=1500)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]
    assert os.listdir(driver_cwd) == [], "the driver writes nothing but its log"

    workers = _node_of(log, "stage1")
    nodes = _alive_nodes(ports)
    assert sorted(workers) == [0, 1], log[-3000:]
    assert len(set(workers.values())) == 2, f"both stage-1 workers on one node: {workers}"
    assert not any(nodes.get(node, True) for node in workers.values()), "a worker ran on the head or a lost node"

    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{ports['S3_PORT']}", region_name="us-east-1",
                      aws_access_key_id="x", aws_secret_access_key="x")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="ul-test", Prefix="pipeline/")
            for o in page.get("Contents", [])]
    for expected in ("metrics/eval.json", "models/stage1/", "models/stage2/", f"{layout.SHARDS}/",
                     f"{layout.LATENTS}/", f"{layout.FID_REFS}/", f"{layout.CHECKPOINTS}/stage1-"):
        expected = f"pipeline/{expected}"
        assert any(k.startswith(expected) for k in keys), f"nothing under s3://ul-test/{expected}"

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("unified-latents").experiment_id])
    assert {"stage1", "stage2", "evaluate"} <= {r.data.tags.get("stage") for r in runs}
    assert {r.data.tags.get("git_commit") for r in runs if r.data.tags.get("stage") == "stage1"} == {
        subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()}
    for name in ("ul-encoder", "ul-decoder", "ul-prior", "ul-base"):
        assert client.search_model_versions(f"name = '{name}'"), f"{name} not registered in the server"

    jobs = jobs_client(env["RAY_ADDRESS"]).list_jobs()
    assert {j.metadata.get("stage") for j in jobs if j.metadata} == set(layout.STAGE_OUTPUTS)  # each stage a job
    exposed = [json.dumps(j.dict(), default=str) for j in jobs] + [
        json.dumps({**r.data.params, **r.data.tags}) for r in runs] + [log]
    assert not [text for text in exposed if DRIVER_SECRET in text], "the driver's secret left the driver"


def test_ray_client_address_is_refused_naming_the_key(cluster, tmp_path):
    from ulcore.config import ConfigError, load_config
    from ulcore.jobs import submit_stage

    cfg = load_config(REPO / "params.yaml", [f"ray.address=ray://127.0.0.1:{cluster[2]['RAY_CLIENT_PORT']}"])
    with pytest.raises(ConfigError, match=r"ray\.address=ray://.*http://127\.0\.0\.1:8265"):
        submit_stage(cfg, "stage1")


def _point_ray_variables_elsewhere(monkeypatch) -> None:
    """What a process that also ran a stage in process carries (ulcore.runtime.ensure_ray sets the first): Ray's
    clients would prefer these addresses to the one they are given."""
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:9")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")


def test_the_configured_address_wins_over_ray_variables_in_the_environment(cluster, monkeypatch):
    from ulcore.jobs import client, live_nodes

    address = f"http://127.0.0.1:{cluster[2]['RAY_DASHBOARD_PORT']}"
    _point_ray_variables_elsewhere(monkeypatch)
    assert len(live_nodes(address)) == 3
    assert isinstance(client(address).list_jobs(), list)
    assert os.environ["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:9", "the caller's environment is restored"


@pytest.mark.parametrize(("overrides", "key"), [
    (["storage.root=/tmp/ul-local-root", "tracking.uri=http://127.0.0.1:1"], "storage.root"),
    (["storage.root=s3://ul-test/refused", "tracking.uri="], "tracking.uri"),
    (["storage.root=s3://ul-test/refused", "tracking.uri=sqlite:///tmp/ul.db"], "tracking.uri"),
])
def test_local_state_on_a_multi_node_cluster_is_refused_before_any_work(cluster, overrides, key, monkeypatch):
    from ulcore.config import ConfigError, load_config
    from ulcore.jobs import client, submit_stage

    _folder, _env, ports = cluster
    address = f"http://127.0.0.1:{ports['RAY_DASHBOARD_PORT']}"
    _point_ray_variables_elsewhere(monkeypatch)
    before = len(client(address).list_jobs())
    cfg = load_config(REPO / "params.yaml", [f"ray.address={address}", *overrides])
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=.*3 nodes.*set {re.escape(key)}="):
        submit_stage(cfg, "shard")
    assert len(client(address).list_jobs()) == before, "a job was submitted anyway"


SLEEPER = "python -c \"import time; print('started', flush=True); time.sleep(600)\""


def test_an_interrupted_submitter_stops_its_job(cluster):
    """Ctrl-C (or Prefect's termination of a cancelled flow run) in the process following a job stops the job."""
    from ulcore.jobs import client

    address = f"http://127.0.0.1:{cluster[2]['RAY_DASHBOARD_PORT']}"
    code = ("from ulcore import jobs\n"
            f"c = jobs.client({address!r})\njob = c.submit_job(entrypoint={SLEEPER!r})\n"
            "print('JOB', job, flush=True)\njobs.follow(c, job, lambda line: print(line, flush=True))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job, deadline = None, time.monotonic() + 180
    for line in proc.stdout:
        job = line.split()[1] if line.startswith("JOB ") else job
        if line.strip() == "started" or time.monotonic() > deadline:
            break
    assert job, "no job submitted"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    assert str(client(address).get_job_status(job).value) == "STOPPED"


def test_cancelling_a_flow_run_stops_the_jobs_it_submitted(cluster):
    """What the flows' on_cancellation hook calls: every unfinished job of that flow run (or of a stage flow
    inside it) is stopped; other jobs are left alone."""
    from ulcore.jobs import client as jobs_client
    from ulcore.jobs import stop_flow_run_jobs

    address = f"http://127.0.0.1:{cluster[2]['RAY_DASHBOARD_PORT']}"
    client = jobs_client(address)
    mine = client.submit_job(entrypoint=SLEEPER, metadata={"prefect_flow_run_id": "child",
                                                          "prefect_root_flow_run_id": "parent"})
    other = client.submit_job(entrypoint=SLEEPER, metadata={"prefect_flow_run_id": "someone-else"})
    try:
        assert stop_flow_run_jobs(address, "parent") == [mine]
        assert str(client.get_job_status(mine).value) == "STOPPED"
        assert str(client.get_job_status(other).value) not in ("STOPPED", "FAILED")
    finally:
        client.stop_job(other)


def _small_stage1(folder: Path, root: str, monkeypatch) -> Any:
    """Stage 1 for 1024 samples with one worker, a checkpoint every 64, under `root`; its data sharded there."""
    from tests.train.smoke import SMOKE
    from ulcore.config import load_config
    from ulcore.jobs import submit_stage

    env = _cluster_env(folder)
    overrides = [*SMOKE, *env["UL_CLUSTER_ARGS"].replace("--set ", "").split(), f"storage.root={root}",
                 "ray.num_workers=1", "stage1.total_samples=1024", "stage1.ckpt_every_samples=64",
                 "stage1.log_every_samples=64"]
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.setenv(key, env[key])  # this test's S3 only: the session's moto endpoint is for the others
    cfg = load_config(REPO / "params.yaml", overrides)
    submit_stage(cfg, "shard")
    return cfg


def _intact_checkpoints(root: str) -> list[str]:
    """Checkpoint folders under `root` whose state.pt is all there: Ray Train uploads a checkpoint's files in no
    set order, so meta.json can be on S3 while state.pt is still on its way."""
    from ulcore import storage
    from ulcore.train.checkpoint import META_FILE, CorruptCheckpointError, check_checkpoint

    intact = []
    for meta_uri in storage.list_uris(f"{root}/checkpoints", suffix=META_FILE):
        folder = meta_uri[: -len(META_FILE) - 1]
        try:
            check_checkpoint(folder)
        except CorruptCheckpointError:
            continue
        intact.append(folder)
    return intact


def _stage1_until_a_checkpoint(cfg: Any) -> tuple[threading.Thread, list[str], dict[str, Any]]:
    """Submit Stage 1 from a thread and return once its first checkpoint is on S3, whole."""
    from ulcore.jobs import submit_stage

    lines: list[str] = []
    result: dict[str, Any] = {}

    def submit() -> None:
        try:
            result.update(summary=submit_stage(cfg, "stage1", on_line=lines.append))
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            result.update(error=exc)

    thread = threading.Thread(target=submit)
    thread.start()
    deadline = time.monotonic() + 600
    while not _intact_checkpoints(cfg.storage.root):
        assert time.monotonic() < deadline and thread.is_alive(), "\n".join(lines[-40:])
        time.sleep(1)
    return thread, lines, result


def _resumed_at(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"\[stage1\] resumed at (\d+) samples", log)]


def test_stage1_survives_losing_the_node_its_worker_runs_on(cluster, monkeypatch):
    """Kill the raylet of the node training runs on: the job resumes from the newest checkpoint on S3 on the other
    worker node and finishes; the sample counter continues from that checkpoint, not from 0."""
    from ulcore import storage

    cfg = _small_stage1(cluster[0], "s3://ul-test/kill", monkeypatch)
    thread, lines, result = _stage1_until_a_checkpoint(cfg)
    node = _node_of("\n".join(lines), "stage1")[0]
    raylets = [p for p in psutil.process_iter(["name", "cmdline"])
               if p.info["name"] == "raylet" and f"--node_id={node}" in (p.info["cmdline"] or [])]
    assert len(raylets) == 1, f"no raylet for node {node}"
    raylets[0].kill()
    thread.join(timeout=900)
    log = "\n".join(lines)
    assert not thread.is_alive() and "summary" in result, f"{result.get('error')}\n{log[-4000:]}"
    resumed = _resumed_at(log)
    assert resumed and resumed[0] > 0, log[-4000:]
    assert _node_of(log.split("retrying from the latest checkpoint")[-1], "stage1")[0] != node
    assert storage.read_json("s3://ul-test/kill/metrics/stage1.json")["samples"] >= 1024


@pytest.mark.timeout(900)  # stage 1 twice (interrupted, then resumed) and a restart of every Ray node
def test_stage1_resubmitted_after_the_whole_ray_cluster_went_away_continues_from_s3(cluster, monkeypatch):
    """Every Ray node replaced mid Stage 1 (new head, new session): the interrupted submission fails, and the same
    command submitted again to the new cluster continues from the checkpoint on S3."""
    from ulcore import storage
    from ulcore.jobs import live_nodes, submit_stage

    folder, env, ports = cluster
    cfg = _small_stage1(folder, "s3://ul-test/gone", monkeypatch)
    thread, lines, result = _stage1_until_a_checkpoint(cfg)
    restart = _cluster(env, "restart-ray", timeout=420)
    assert restart.returncode == 0, restart.stderr[-3000:]
    thread.join(timeout=300)
    assert not thread.is_alive() and "error" in result, "\n".join(lines[-40:])
    assert not [p for p in psutil.process_iter(["cwd"]) if str(folder / "head") in (p.info["cwd"] or "")
                and "_ray_pkg_" in (p.info["cwd"] or "")], "a job driver of the old cluster is still running"
    assert len(live_nodes(f"http://127.0.0.1:{ports['RAY_DASHBOARD_PORT']}")) == 3

    again: list[str] = []
    submit_stage(cfg, "stage1", on_line=again.append)
    log = "\n".join(again)
    resumed = _resumed_at(log)
    assert resumed and resumed[0] > 0, log[-4000:]
    assert storage.read_json("s3://ul-test/gone/metrics/stage1.json")["samples"] >= 1024


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


def test_a_held_node_port_is_named_before_anything_starts(tmp_path):
    """A raylet whose port is taken, even by an outgoing connection's local end, dies at start and `ray start` only
    says "timed out during startup": `up` checks every node's fixed ports first and names the one that is held."""
    ports = _ports()
    held_port = int(ports["RAY_NODE_PORT_BASE"]) + 100  # worker1's node-manager port
    with socket.create_server(("127.0.0.1", 0)) as server, socket.socket() as client:
        client.bind(("127.0.0.1", held_port))
        client.connect(server.getsockname())
        env = {**os.environ, **ports, "CLUSTER_DIR": str(tmp_path), "BIN": str(BIN)}
        up = _cluster(env, "up", timeout=60)
    assert up.returncode == 1
    assert f"port {held_port} (worker1's node-manager port" in up.stderr, up.stderr
    assert not list(tmp_path.glob("*.pid")) and not list(tmp_path.glob("*.log"))
