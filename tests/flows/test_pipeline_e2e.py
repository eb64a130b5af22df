"""End to end with the real stages at smoke scale, in a temporary git + DVC copy of the project:
`make stack`'s script starts a Prefect server, a process worker and an MLflow server on free loopback ports;
`prefect deployment run ul/full-pipeline` completes; MLflow holds the runs and registered models; `dvc status`
is clean but for raw_manifest (always changed: it lists the raw data); `dvc repro` then only relists the raw data;
`dvc exp run -S` reruns only the stage it touches; `dvc push`/`pull`
round-trip through a moto S3 server; a deployment run with bad params fails naming the key; the scheduled retrain
deployment fires by itself, retrains on new data, drops the triggers that arrive meanwhile and the gate keeps the
champion against a candidate trained with a quarter of the steps."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from flowkit import BIN, copy_project, env_for, free_port, sh, smoke_params_yaml

pytestmark = pytest.mark.slow
ALWAYS_CHANGED = {"raw_manifest": ["always changed"]}  # `dvc status` of an up-to-date pipeline


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Project copy + a running local stack (infra/stack.sh up), torn down afterwards."""
    tmp = tmp_path_factory.mktemp("e2e")
    project = copy_project(tmp / "proj", smoke_params_yaml())
    ports = {"PREFECT_PORT": str(free_port()), "MLFLOW_PORT": str(free_port())}
    env = env_for(tmp, STACK_DIR=str(tmp / "stack"), PREFECT_HOME=str(tmp / "prefect-home"), BIN=str(BIN), **ports,
                  PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5")  # schedules take effect within seconds
    try:
        sh(["bash", "infra/stack.sh", "up"], project, env, timeout=240)
        env.update(PREFECT_API_URL=f"http://127.0.0.1:{ports['PREFECT_PORT']}/api",
                   MLFLOW_TRACKING_URI=f"http://127.0.0.1:{ports['MLFLOW_PORT']}")
        yield project, env
    finally:
        sh(["bash", "infra/stack.sh", "down"], project, env, timeout=120, check=False)
        pids = list((tmp / "stack").glob("*.pid"))
        assert not pids, f"stack.sh down left {pids}"
        left = _flow_run_processes(f"http://127.0.0.1:{ports['PREFECT_PORT']}/api")
        assert not left, f"stack.sh down left flow-run processes running: {left}"


def _flow_run_processes(api_url: str) -> list[str]:
    """Pids of processes a flow run of the stack at `api_url` started (they carry its URL and a flow run id)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            variables = environ.read_bytes().split(b"\0")
        except OSError:
            continue
        if f"PREFECT_API_URL={api_url}".encode() in variables and any(
                v.startswith(b"PREFECT__FLOW_RUN_ID=") for v in variables):
            found.append(environ.parent.name)
    return found


def _dvc(project: Path, env: dict, *args: str, timeout: float = 600):
    return sh([str(BIN / "dvc"), *args], project, env, timeout=timeout)


def test_deployment_runs_full_pipeline(stack):
    project, env = stack
    start = time.perf_counter()
    out = sh([str(BIN / "prefect"), "deployment", "run", "ul/full-pipeline", "--watch", "--watch-interval", "2",
              "--watch-timeout", "420"], project, env, timeout=480, check=False)
    assert out.returncode == 0, f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    assert "Completed" in out.stdout
    print(f"full pipeline through the deployment: {time.perf_counter() - start:.0f} s")

    for name in ("shards/summary.json",):
        assert (project / "data" / name).is_file()
    for rel in ("models/stage1/config.yaml", "models/stage2/config.yaml", "metrics/stage1.json",
                "metrics/stage2.json", "metrics/eval.json"):
        assert (project / rel).is_file(), rel
    assert json.loads((project / "metrics/eval.json").read_text())

    import mlflow

    c = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name("unified-latents")
    runs = c.search_runs([exp.experiment_id])
    stages = {r.data.tags.get("stage") for r in runs}
    assert {"pipeline", "stage1", "stage2"} <= stages
    parent = next(r for r in runs if r.data.tags["stage"] == "pipeline")
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {"stage1", "stage2"} <= {r.data.tags["stage"] for r in children}
    assert all(r.data.tags["git_commit"] != "unknown" and r.data.tags["prefect_flow_run_id"] != "none"
               for r in children)
    models = {m.name for m in c.search_registered_models()}
    assert {"ul-encoder", "ul-decoder", "ul-prior"} <= models and any(m.startswith("ul-base") for m in models)
    promotion = json.loads((project / "metrics/promotion.json").read_text())  # the first run promotes
    assert promotion["promoted"] is True and promotion["champion"] is None and "gfid" in promotion["candidate"]
    champions = {c.get_model_version_by_alias(f"ul-{n}", "champion").run_id for n in ("encoder", "decoder", "prior")}
    assert champions == {c.get_model_version_by_alias("ul-base", "champion").tags["stage1_run_id"]}

    assert json.loads(_dvc(project, env, "status", "--json").stdout) == ALWAYS_CHANGED


def _stages_run(out) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", out.stdout)


def test_dvc_repro_is_noop_then_exp_run_reruns_one_stage(stack):
    project, env = stack
    start = time.perf_counter()
    out = _dvc(project, env, "repro")
    noop_s = time.perf_counter() - start
    assert _stages_run(out) == ["raw_manifest"], out.stdout  # the raw data is unchanged: nothing else runs
    assert noop_s < 60  # the listing's flow starts a temporary Prefect API (~10 s on a busy 2-core machine)
    sh(["git", "add", "-A"], project, env)
    sh(["git", "commit", "-q", "-m", "pipeline outputs recorded"], project, env)
    out = _dvc(project, env, "exp", "run", "-S", "eval.seed=7", "-n", "seed7", timeout=600)
    assert "Running stage 'evaluate'" in out.stdout and "Running stage 'stage1'" not in out.stdout, out.stdout
    assert "Running stage 'promote'" in out.stdout  # another seed: the champion is measured again under it
    out = _dvc(project, env, "repro")
    assert _stages_run(out) == ["raw_manifest"], out.stdout


def test_dvc_push_pull_through_s3(stack, s3_endpoint):
    import boto3

    project, env = stack
    env = dict(env, AWS_ENDPOINT_URL=s3_endpoint, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
               AWS_DEFAULT_REGION="us-east-1")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="dvc-remote")
    _dvc(project, env, "remote", "add", "-f", "-d", "s3remote", "s3://dvc-remote/store")
    _dvc(project, env, "remote", "modify", "s3remote", "endpointurl", s3_endpoint)
    _dvc(project, env, "push")
    listed = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="dvc-remote")
    assert listed["KeyCount"] > 0
    before = (project / "models/stage1/config.yaml").read_bytes()
    shutil.rmtree(project / ".dvc" / "cache")
    shutil.rmtree(project / "models")
    _dvc(project, env, "pull")
    assert (project / "models/stage1/config.yaml").read_bytes() == before
    assert json.loads(_dvc(project, env, "status", "--json").stdout) == ALWAYS_CHANGED


def test_deployment_with_bad_params_fails_naming_the_key(stack):
    project, env = stack
    out = sh([str(BIN / "prefect"), "deployment", "run", "ul/full-pipeline", "--param",
              'overrides=["stage1.lr=-1"]', "--watch", "--watch-interval", "1", "--watch-timeout", "120"],
             project, env, timeout=180, check=False)
    assert out.returncode != 0 and "Failed" in out.stdout
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", out.stdout).group(1)
    logs = sh([str(BIN / "prefect"), "flow-run", "logs", run_id], project, env, check=False)
    assert "stage1.lr" in logs.stdout + logs.stderr


RETRAIN_RUNS = """
import asyncio, json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName, LogFilter, LogFilterFlowRunId

async def main():
    async with get_client() as client:
        runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["ul-retrain"])))
        out = []
        for run in runs:
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            out.append({"state": run.state_type.value if run.state_type else None,
                        "message": run.state.message if run.state else "",
                        "logs": "\\n".join(log.message for log in logs)})
        print(json.dumps(out))

asyncio.run(main())
"""


def _retrain_runs(project: Path, env: dict) -> list[dict]:
    import sys

    return json.loads(sh([sys.executable, "-c", RETRAIN_RUNS], project, env, timeout=120).stdout)


def test_scheduled_retrain_fires_by_itself_drops_overlaps_and_gates_promotion(stack):
    """An interval schedule of 15 s on ul-retrain/scheduled-retrain: the first run finds new raw data (a larger
    embedded set, whose manifest is its build) and retrains; the triggers that fall due meanwhile are cancelled by
    the deployment's concurrency limit, not queued; the first trigger after it finds nothing new and ends at once.
    The candidate trains for 32 samples per stage instead of 128, one step of 32 (a tenth is no multiple of the
    batch): measured at this scale, gFID 484 vs 464-467 and PSNR 6.2 vs 6.7-6.8 dB (two seeds), so the default gate
    (gFID 5 % lower, PSNR at most 0.2 dB lower) keeps the champion, and metrics/promotion.json and MLflow say why."""
    import mlflow

    project, env = stack
    _dvc(project, env, "remote", "remove", "s3remote")  # the worker has no credentials for the test's S3 remote
    (project / "params.yaml").write_text(smoke_params_yaml(["data.embedded_train_per_class=20",
                                                            "stage1.total_samples=32", "stage2.total_samples=32"]))
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    champion = {n: client.get_model_version_by_alias(f"ul-{n}", "champion").version
                for n in ("encoder", "decoder", "prior", "base")}
    prefect = str(BIN / "prefect")
    sh([prefect, "deployment", "schedule", "create", "ul-retrain/scheduled-retrain", "--interval", "15",
        "--replace", "-y"], project, env)
    deadline, runs = time.monotonic() + 1200, []
    try:
        while time.monotonic() < deadline:
            runs = _retrain_runs(project, env)
            done = [r for r in runs if r["state"] == "COMPLETED"]
            if any(r["state"] in ("FAILED", "CRASHED") for r in runs) or (
                    any("retraining (new raw data)" in r["logs"] for r in done)
                    and any("nothing to do" in r["logs"] for r in done)):
                break
            time.sleep(10)
    finally:
        sh([prefect, "deployment", "schedule", "clear", "ul-retrain/scheduled-retrain", "-y"], project, env,
           check=False)
    summary = [(r["state"], r["message"], r["logs"][-300:]) for r in runs]
    assert not [r for r in runs if r["state"] in ("FAILED", "CRASHED")], summary
    done = [r for r in runs if r["state"] == "COMPLETED"]
    retrained = [r for r in done if "retraining (new raw data)" in r["logs"]]
    assert len(retrained) == 1, summary
    assert any("nothing to do: raw data unchanged" in r["logs"] for r in done), summary
    assert [r for r in runs if r["state"] == "CANCELLED"], f"no trigger was dropped while the retrain ran: {summary}"

    promotion = json.loads((project / "metrics/promotion.json").read_text())
    candidate, kept = promotion["candidate"], promotion["champion"]
    assert promotion["promoted"] is False and promotion["reason"].startswith(
        f"rejected: gfid {candidate['gfid']:.6g} vs champion {kept['gfid']:.6g}: "), promotion
    assert "% worse, promotion needs >= 5.00% better (lower)" in promotion["reason"], promotion
    assert "champion re-evaluated under protocol" in promotion["reason"], promotion  # new data, new references
    assert candidate["psnr"] < kept["psnr"] - 0.2, promotion  # worse on the guard too, not only by chance on gFID
    assert {n: client.get_model_version_by_alias(f"ul-{n}", "champion").version for n in champion} == champion
    rejected = client.search_runs([client.get_experiment_by_name("unified-latents").experiment_id],
                                  "tags.stage = 'promote'")
    assert any(r.info.run_name.startswith("promotion: rejected") for r in rejected)
    shards = json.loads((project / "data/shards/summary.json").read_text())
    assert json.loads((project / "data/raw_manifest.json").read_text())["digest"] == \
        shards["raw_manifest"]["digest"], "the shards were rebuilt from the new raw data"
