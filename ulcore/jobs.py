"""Stages as Ray jobs: with `ray.address = http://<head>:8265` a stage runs on the cluster, submitted through the
Ray Jobs API, and this process only submits, streams the job's log and waits.

Why the Jobs API and not Ray Client (`ray://`): a Ray Train driver must live on the cluster (Ray's docs say Ray
Client does not work reliably with Ray Train), and a job survives the submitter's network blips. The job runs

    python -m ulcore.stages <stage> ul_job/config.yaml

in a copy of the project at the submitter's git commit (`git archive HEAD`, so data, virtualenvs and outputs never
travel), with the resolved config beside it. Inside the job `ray.address` becomes `auto`: the job's driver joins
the cluster it runs on. The job prints its summary as one `UL_JOB_RESULT {json}` line, which the submitter reads
back from the log it streams.

Nothing secret travels: the runtime env carries the git commit, the parent MLflow run and the Prefect flow run
only; the cluster's nodes take S3 credentials from their own environment or instance role (docs/design.md §5).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ulcore import storage, tracking
from ulcore.config import Config, ConfigError
from ulcore.run_lock import stage_lock

JOB_CONFIG = "ul_job/config.yaml"  # where the resolved config sits inside the shipped working dir
ROOT_FLOW_RUN_ENV = "UL_PREFECT_ROOT_FLOW_RUN_ID"  # the outermost Prefect flow run: a job is stopped with it
RESULT_MARK = "UL_JOB_RESULT "  # prefix of the job's last line: the stage's summary as JSON
FINISHED = ("SUCCEEDED", "FAILED", "STOPPED")
STOP_WAIT_S = 30.0  # after stop_job, how long to wait for the job to report STOPPED
SUBMIT_RETRY_S = 120.0  # how long a busy head (no free job agent, gateway timeout) is retried
BUSY_MARKS = ("No available agent", "status code 503", "status code 504")
# Ray's submission client logs every packaged .gitignore and websocket close at INFO: noise in a flow's log
QUIET_LOGGERS = ("ray._private.runtime_env.packaging", "ray.dashboard.modules.dashboard_sdk",
                 "ray.dashboard.modules.job.sdk")


class JobFailed(RuntimeError):
    """A stage's Ray job ended FAILED or STOPPED; the message carries the job's own error."""

    def __init__(self, job_id: str, status: str, message: str):
        super().__init__(f"Ray job {job_id} {status}: {message}")
        self.job_id, self.status = job_id, status


def is_jobs_endpoint(address: str) -> bool:
    return address.startswith(("http://", "https://"))


def refuse_ray_client(address: str) -> None:
    """`ray://` (Ray Client) cannot host a Ray Train driver reliably: name the key and what to set instead."""
    if address.startswith("ray://"):
        host = address[len("ray://"):].rsplit(":", 1)[0] or "<head>"
        raise ConfigError(
            f"ray.address={address}: Ray Client (ray://) is not supported for training stages; set ray.address to "
            f"the cluster's Ray Jobs endpoint, e.g. ray.address=http://{host}:8265, and each stage runs as a Ray job")


def refuse_local_state(cfg: Config, nodes: int) -> None:
    """On a cluster of several nodes every node must see the same outputs and the same tracking store."""
    if nodes <= 1:
        return
    where = f"the Ray cluster at {cfg.ray.address} has {nodes} nodes"
    if not storage.is_s3(cfg.storage.root):
        raise ConfigError(
            f"storage.root={cfg.storage.root!r} is a local folder but {where}: a node would write shards, "
            f"checkpoints and models to its own disk; set storage.root=s3://<bucket>/<prefix>")
    uri = cfg.tracking.uri
    if not uri.startswith(("http://", "https://", "databricks")):
        shown = uri or "'' (a SQLite file under storage.root)"
        raise ConfigError(
            f"tracking.uri={shown} is a local store but {where}: runs logged on another node would be lost; set "
            f"tracking.uri=http://<mlflow-server>:5000")


# Ray's clients take their address from these variables over the argument they are given
# (`ray.dashboard.utils.get_address_for_submission_client`), so a process that also started a local instance
# (ulcore.runtime.ensure_ray sets RAY_API_SERVER_ADDRESS) would submit to that instance instead of `ray.address`.
ADDRESS_OVERRIDES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


@contextlib.contextmanager
def _address_as_given() -> Iterator[None]:
    saved = {key: os.environ.pop(key) for key in ADDRESS_OVERRIDES if key in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def client(address: str) -> Any:
    """A Jobs API client of the cluster at `address`, whatever RAY_ADDRESS / RAY_API_SERVER_ADDRESS say."""
    from ray.job_submission import JobSubmissionClient

    with _address_as_given():
        return JobSubmissionClient(address)


def live_nodes(address: str) -> list[Any]:
    """The ALIVE nodes of the cluster at `address` (Ray state API records: node_id, is_head_node, ...)."""
    from ray.util.state import list_nodes

    with _address_as_given():
        return list_nodes(address=address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)


def project_root() -> Path:
    return Path(__file__).resolve().parents[1]


def package_project(cfg: Config, dest: Path) -> str:
    """Write the project at HEAD plus the resolved config into `dest`; return the commit shipped."""
    root = project_root()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=30)
    if head.returncode != 0:
        raise RuntimeError(f"{root} is not a git checkout ({head.stderr.strip()}): the Ray job ships the project "
                           f"at a commit, so run from a clone of the repository")
    commit = head.stdout.strip()
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=root, capture_output=True, timeout=120)
    if archive.returncode != 0:
        raise RuntimeError(f"git archive {commit} failed: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True, timeout=120)
    (dest / JOB_CONFIG).parent.mkdir(parents=True, exist_ok=True)
    (dest / JOB_CONFIG).write_text(cfg.to_yaml())
    return commit


def uncommitted_changes() -> bool:
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project_root(),
                         capture_output=True, text=True, timeout=30)
    return bool(out.stdout.strip())


def lineage_env(commit: str) -> dict[str, str]:
    """What the job needs to tag its MLflow runs like an in-process stage: the commit, the pipeline's parent run and
    the Prefect flow run. Never credentials: nodes have their own."""
    env = {tracking.GIT_COMMIT_ENV: commit}
    env.update({k: os.environ[k] for k in (tracking.PARENT_ENV, tracking.FLOW_RUN_ENV) if os.environ.get(k)})
    return env


def submit_stage(cfg: Config, stage: str, *, on_line: Callable[[str], None] = print) -> dict[str, Any]:
    """Run `stage` as a Ray job on the cluster at `cfg.ray.address`, holding the storage root's lock for the stage
    meanwhile; return its summary or raise JobFailed. Imports no stage code (no torch): a driver stays small."""
    address = cfg.ray.address
    refuse_ray_client(address)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    jobs = client(address)
    refuse_local_state(cfg, len(live_nodes(address)))
    if uncommitted_changes():
        on_line("WARNING: uncommitted changes are not shipped: the Ray job runs the project at HEAD")
    with stage_lock(cfg.storage.root, stage):
        return _submit_and_follow(jobs, cfg, stage, on_line)


def _submit_and_follow(client: Any, cfg: Config, stage: str, on_line: Callable[[str], None]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"ul-job-{stage}-") as tmp:
        commit = package_project(cfg, Path(tmp))
        env = lineage_env(commit)
        job_id = _submit(
            client,
            entrypoint=f"python -m ulcore.stages {stage} {JOB_CONFIG}",
            submission_id=f"ul-{stage}-{cfg.digest()}-{uuid.uuid4().hex[:8]}",
            runtime_env={"working_dir": tmp, "env_vars": env},
            metadata={"stage": stage, "config_digest": cfg.digest(), "git_commit": commit,
                      "prefect_flow_run_id": os.environ.get(tracking.FLOW_RUN_ENV, "none"),
                      "prefect_root_flow_run_id": os.environ.get(ROOT_FLOW_RUN_ENV, "none")})
    on_line(f"submitted {stage} as Ray job {job_id} to {cfg.ray.address} (commit {commit[:10]})")
    return follow(client, job_id, on_line)


def _submit(client: Any, *, submission_id: str, **job: Any) -> str:
    """submit_job, retried while the head answers that it is busy (no job agent free yet, a gateway timeout) for
    up to SUBMIT_RETRY_S; the fixed submission id makes a retry of a submission that did go through harmless."""
    deadline = time.monotonic() + SUBMIT_RETRY_S
    while True:
        try:
            return client.submit_job(submission_id=submission_id, **job)
        except RuntimeError as exc:
            if "already exists" in str(exc):
                return submission_id
            if not any(mark in str(exc) for mark in BUSY_MARKS) or time.monotonic() > deadline:
                raise
            time.sleep(5)


def follow(client: Any, job_id: str, on_line: Callable[[str], None]) -> dict[str, Any]:
    """Stream the job's log to `on_line` until it ends; stop the job if this process is interrupted."""
    result: dict[str, Any] = {}
    try:
        for line in _log_lines(client, job_id):
            if line.startswith(RESULT_MARK):
                result = json.loads(line[len(RESULT_MARK):])
            else:
                on_line(line)
        status = _final_status(client, job_id)
    except BaseException:  # Ctrl-C, Prefect's TerminationSignal on cancellation, a lost connection
        stop(client, job_id)
        raise
    if status != "SUCCEEDED":
        raise JobFailed(job_id, status, client.get_job_info(job_id).message or "(no message)")
    return result


def _log_lines(client: Any, job_id: str) -> Any:
    """The job's log, line by line, as it is written (tail_job_logs ends when the job does)."""
    # tail_job_logs is an async generator: step it chunk by chunk in a private event loop
    loop = asyncio.new_event_loop()
    try:
        agen = client.tail_job_logs(job_id).__aiter__()
        while True:
            try:
                chunk = loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                break
            yield from chunk.splitlines()
    finally:
        loop.close()


def _final_status(client: Any, job_id: str, timeout_s: float = 60.0) -> str:
    """The job's status once it is final (the log stream can end a moment before the status does)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in FINISHED or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def stop(client: Any, job_id: str) -> None:
    """Stop a running job and wait (bounded) until Ray reports it finished."""
    try:
        client.stop_job(job_id)
        _final_status(client, job_id, STOP_WAIT_S)
    except Exception as exc:  # noqa: BLE001 - stopping is best effort: report, never mask the original error
        print(f"could not stop Ray job {job_id}: {exc}", file=sys.stderr)


def stop_flow_run_jobs(address: str, flow_run_id: str) -> list[str]:
    """Stop every unfinished job a Prefect flow run submitted (its on_cancellation hook); return their ids."""
    def submitted_by(meta: dict[str, str]) -> bool:
        return flow_run_id in (meta.get("prefect_flow_run_id"), meta.get("prefect_root_flow_run_id"))

    jobs = client(address)
    mine = [j.submission_id for j in jobs.list_jobs()
            if submitted_by(j.metadata or {}) and str(j.status.value) not in FINISHED]
    for job_id in mine:
        stop(jobs, job_id)
    return mine


