"""The flow wrappers with stand-in stage functions (real Prefect API, real MLflow, real DVC): params
validation, markdown artefacts, lineage tags, nesting, DVC recording, failure and resume."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest

from flowkit import REPO, copy_project, env_for, sh, smoke_params_yaml

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture()
def fake_stages(monkeypatch):
    import _fake_stages

    from ulcore import stages

    for stage in stages.STAGES:
        monkeypatch.setitem(stages.BY_NAME, stage.name,
                            dataclasses.replace(stage, run=getattr(_fake_stages, "run_" + stage.name)))
    monkeypatch.delenv("UL_FAKE_FAIL", raising=False)
    monkeypatch.delenv("UL_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_cli_rejects_bad_params_before_any_work(tmp_path):
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "flows.stage1", "--params", str(tmp_path / "missing.yaml")],
                         cwd=REPO, capture_output=True, text=True, timeout=60, env=env_for())
    assert out.returncode == 2 and "params file not found" in out.stderr
    (tmp_path / "p.yaml").write_text("preset: tiny\n")
    out = subprocess.run([sys.executable, "-m", "flows.pipeline", "--params", str(tmp_path / "p.yaml"),
                          "--set", "stage1.lr=-1"], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env=env_for())
    assert out.returncode == 2 and "stage1.lr" in out.stderr
    assert "Starting temporary server" not in out.stdout + out.stderr  # failed before Prefect started
    assert time.perf_counter() - start < 30


def test_bad_params_fail_the_flow_run_naming_the_key(tmp_path):
    from flows.stage2 import stage2

    (tmp_path / "p.yaml").write_text("preset: tiny\n")
    state = stage2(params=str(tmp_path / "p.yaml"), overrides=["stage2.label_dropout=2"], return_state=True)
    assert state.is_failed() and "stage2.label_dropout" in state.message


def test_stage_flow_publishes_summary_and_tags_mlflow(tmp_path, monkeypatch, fake_stages):
    from prefect.artifacts import Artifact

    from flows.stage1 import stage1
    from ulcore import tracking
    from ulcore.config import load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(smoke_params_yaml())
    state = stage1(return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["stage"] == "stage1" and result["written"] == 1
    assert (tmp_path / "heartbeats.txt").read_text().split() == ["stage1", "180"]  # a top-level run keeps them
    assert (tmp_path / "models/stage1/encoder.safetensors").is_file()
    cfg = load_config("params.yaml")
    c = tracking.client(tracking.tracking_uri(cfg))
    run = c.get_run(result["mlflow_run_id"])
    assert run.data.tags["prefect_flow_run_id"] == str(state.state_details.flow_run_id)
    assert run.data.tags["stage"] == "stage1"
    artifact = Artifact.get("ul-stage1")
    assert artifact is not None and artifact.type == "markdown"
    assert "fake stage1" in artifact.data and "| loss | 0.5 |" in artifact.data
    assert result["mlflow_run_id"] in artifact.data  # the link to the MLflow run


@pytest.mark.slow
def test_pipeline_failure_then_resume_records_dvc_versions(tmp_path, monkeypatch, fake_stages):
    """stage2 fails: the flow run is Failed with the error; the stages before it are recorded in dvc.lock. The rerun
    lists the raw data again, skips them, runs stage2 and evaluate, and leaves `dvc status` clean (but for the
    always-changed raw_manifest); MLflow runs nest under the pipeline."""
    from flows.pipeline import ul
    from ulcore import tracking
    from ulcore.config import load_config

    project = copy_project(tmp_path / "proj", smoke_params_yaml())
    monkeypatch.chdir(project)
    monkeypatch.setenv("UL_FAKE_FAIL", "stage2")
    state = ul(return_state=True)
    assert state.is_failed()
    assert "fake failure in stage2" in state.message
    assert (project / "calls.txt").read_text().split() == ["raw_manifest", "shard", "reference", "stage1", "encode",
                                                           "stage2"]
    lock = (project / "dvc.lock").read_text()
    assert "shard:" in lock and "encode:" in lock and "stage2:" not in lock

    monkeypatch.delenv("UL_FAKE_FAIL")
    (project / "calls.txt").unlink()
    state = ul(return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert (project / "calls.txt").read_text().split() == ["raw_manifest", "stage2", "evaluate", "promote"]  # the
    # raw data is listed on every run; its record is unchanged, so the shard stage stays up to date
    # subflows run without heartbeats of their own (the parent's cover the process): no 1 s join at each exit
    assert (project / "heartbeats.txt").read_text().splitlines()[-3:] == ["stage2 None", "evaluate None",
                                                                          "promote None"]
    assert result["stages"]["shard"] == {"skipped": "up to date in dvc.lock"}
    assert result["dvc"] == "versions recorded in dvc.lock" and result["dvc_push"] == "no DVC remote configured"
    status = sh([sys.executable, "-m", "dvc", "status", "--json"], project, env_for())
    assert json.loads(status.stdout) == {"raw_manifest": ["always changed"]}

    cfg = load_config("params.yaml")
    c = tracking.client(tracking.tracking_uri(cfg))
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    children = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}'")
    assert sorted(r.data.tags["stage"] for r in children) == ["evaluate", "promote", "raw_manifest", "stage2"]
    failed = c.search_runs([exp.experiment_id], "attributes.status = 'FAILED'")
    assert {r.data.tags["stage"] for r in failed} == {"stage2", "pipeline"}
    assert all(r.data.tags["git_commit"] != "unknown" for r in children)


@pytest.mark.slow
def test_pipeline_with_overrides_does_not_record(tmp_path, monkeypatch, fake_stages):
    from flows.pipeline import ul

    project = copy_project(tmp_path / "proj", smoke_params_yaml())
    monkeypatch.chdir(project)
    state = ul(overrides=["eval.seed=7"], return_state=True)
    assert state.is_completed(), state.message
    assert "params differ from params.yaml" in state.result()["dvc"]
    assert not (project / "dvc.lock").exists()
    assert os.environ.get("UL_PARENT_RUN_ID") is None
