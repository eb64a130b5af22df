"""What every stage flow does: validate params, call one ulcore stage function as a task, publish a markdown
artefact with what it wrote and a link to its MLflow run. Only the params path, overrides and small summary
dicts cross task boundaries (never tensors).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from ulcore import jobs, layout, tracking
from ulcore.config import Config, load_config

STAGES = list(layout.STAGE_OUTPUTS)  # in pipeline order, the names of ulcore.stages.STAGES (tests/test_stages.py)


def load(params: str, overrides: list[str] | None) -> Config:
    """Validate first: a bad key or value fails the flow run at once, with the key named (ConfigError)."""
    cfg = load_config(params, list(overrides or []))
    if cfg.storage.s3_endpoint:
        os.environ.setdefault("AWS_ENDPOINT_URL", cfg.storage.s3_endpoint)
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", cfg.storage.s3_endpoint)
    return cfg


@contextlib.contextmanager
def flow_run_lineage() -> Iterator[str]:
    """Export this flow run's id so ulcore.tracking tags the MLflow runs it opens (ulcore imports no Prefect)."""
    run_id = str(flow_run.get_id() or "none")
    with tracking.environ_restored(tracking.FLOW_RUN_ENV, jobs.ROOT_FLOW_RUN_ENV):
        os.environ[tracking.FLOW_RUN_ENV] = run_id
        os.environ.setdefault(jobs.ROOT_FLOW_RUN_ENV, run_id)  # the outermost flow: what a cancellation names
        yield run_id


def stop_jobs_on_cancel(flow: Any, flow_run: Any, state: Any) -> None:
    """on_cancellation hook: stop the Ray jobs this flow run (or a stage flow inside it) submitted. Prefect runs it
    once it has stopped the flow run's process; without it the jobs would go on training unobserved."""
    params = flow_run.parameters or {}
    cfg = load(params.get("params", "params.yaml"), params.get("overrides"))
    if jobs.is_jobs_endpoint(cfg.ray.address):
        stopped = jobs.stop_flow_run_jobs(cfg.ray.address, str(flow_run.id))
        print(f"flow run {flow_run.id} cancelled: stopped Ray jobs {stopped or 'none (all had finished)'}")


@task(name="run-stage", task_run_name="run-{stage}")
def run_stage_task(stage: str, params: str, overrides: list[str]) -> dict[str, Any]:
    """The stage itself (its own Ray cluster / Ray Train driver, or a Ray job on a cluster's Jobs endpoint whose
    log lands here): one task, resumable by rerunning; a second run of it on this root refuses at once."""
    cfg = load(params, overrides)
    if jobs.is_jobs_endpoint(cfg.ray.address):  # this process only follows the job: no stage code, no torch
        return jobs.submit_stage(cfg, stage, on_line=get_run_logger().info)
    from ulcore import stages  # imports every stage's code (torch, Ray, ...): not before params are validated

    return stages.run_stage(stage, cfg)


def mlflow_runs_of(cfg: Config, prefect_run_id: str) -> list[tuple[str, str, str]]:
    """(stage, run id, link) of the MLflow runs this flow run opened, found by their lineage tag."""
    try:
        c = tracking.client(tracking.tracking_uri(cfg))
        exp = c.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            return []
        runs = c.search_runs([exp.experiment_id], f"tags.prefect_flow_run_id = '{prefect_run_id}'")
        return [(r.data.tags.get("stage", "?"), r.info.run_id, tracking.run_url(r.info.run_id, c.tracking_uri))
                for r in runs]
    except Exception:  # noqa: BLE001 - a missing link must not fail a finished stage
        return []


def summary_markdown(stage: str, result: dict[str, Any], runs: list[tuple[str, str, str]],
                     cfg: Config) -> str:
    lines = [f"# ul-{stage}", "", f"preset `{cfg.preset}`, config digest `{cfg.digest()}`, "
             f"storage root `{cfg.storage.root}`", ""]
    scalars = {k: v for k, v in result.items() if k != "markdown" and isinstance(v, (int, float, str, bool))}
    others = {k: v for k, v in result.items() if k != "markdown" and k not in scalars}
    if scalars:
        lines += ["| key | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in scalars.items()]
        lines.append("")
    for key, value in others.items():
        text = json.dumps(value, indent=1, default=str)
        lines += [f"**{key}**", "", "```json", text[:4000], "```", ""]
    if result.get("markdown"):
        lines += [str(result["markdown"]), ""]
    if runs:
        lines += ["MLflow: " + ", ".join(f"[{s} `{rid[:8]}`]({url})" for s, rid, url in runs), ""]
        lines.append(f"Open the UI with `{tracking.ui_command(cfg)}`.")
    return "\n".join(lines)


@task(name="publish-summary", retries=2, retry_delay_seconds=1)
def publish_summary(stage: str, markdown: str) -> None:
    key = f"ul-{stage.replace('_', '-')}"  # artefact keys allow lower-case letters, digits and dashes only
    create_markdown_artifact(markdown=markdown, key=key, description=f"What ul-{stage} wrote")


def stage_flow_body(stage: str, params: str, overrides: list[str]) -> dict[str, Any]:
    """Body shared by the stage flows."""
    logger = get_run_logger()
    cfg = load(params, overrides)
    with flow_run_lineage() as prefect_run_id:
        logger.info("ul-%s: preset %s, config %s, storage root %s", stage, cfg.preset, cfg.digest(),
                    cfg.storage.root)
        result = run_stage_task(stage, params, list(overrides or []))
        runs = mlflow_runs_of(cfg, prefect_run_id)
        publish_summary(stage, summary_markdown(stage, result, runs, cfg))
    if runs:
        result.setdefault("mlflow_run_id", runs[0][1])
    return result
