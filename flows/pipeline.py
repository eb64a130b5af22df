"""Flow `ul` (deployment `ul/full-pipeline`): raw_manifest -> shard -> reference -> stage1 -> encode -> stage2 ->
evaluate -> promote as subflows.

It opens the parent MLflow run (stage runs nest under it through UL_PARENT_RUN_ID), records each finished
stage's versions in dvc.lock (`dvc commit`), skips stages that dvc.lock already shows up to date (so a rerun
after a failure resumes at the failed stage; `raw_manifest` is always changed, so every run lists the raw data and the
shard stage runs exactly when that changed), and pushes to the DVC remote when one is configured. See
flows/_versions.py for when DVC recording applies.

Run: `python -m flows.pipeline [--params params.yaml] [--set section.key=value ...]`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from flows import _versions
from flows._common import STAGES, flow_run_lineage, load, publish_summary, stop_jobs_on_cancel, summary_markdown
from flows.encode import encode
from flows.evaluate import evaluate
from flows.promote import promote
from flows.raw_manifest import raw_manifest
from flows.reference import reference
from flows.shard import shard
from flows.stage1 import stage1
from flows.stage2 import stage2
from ulcore import tracking

SUBFLOWS = {"raw_manifest": raw_manifest, "shard": shard, "reference": reference, "stage1": stage1, "encode": encode,
            "stage2": stage2, "evaluate": evaluate, "promote": promote}
# Subflows run in the `ul` flow's process, whose own heartbeats tell the server it is alive (a crash takes both
# down), so they run without: Prefect joins a flow's heartbeat thread at exit and that thread sleeps in 1 s steps,
# which cost ~1 s per subflow (a bare subflow call measured 1.26 s with heartbeats, 0.30 s without).
SUBFLOW_SETTINGS = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}


@task(name="dvc-status", task_run_name="dvc-status-{stage}", retries=1, retry_delay_seconds=1)
def up_to_date(root: str, stage: str) -> bool:
    return _versions.stage_up_to_date(Path(root), stage)


@task(name="dvc-commit", task_run_name="dvc-commit-{stage}", retries=1, retry_delay_seconds=2)
def record(root: str, stage: str) -> None:
    _versions.commit_stage(Path(root), stage)


@task(name="dvc-push", retries=2, retry_delay_seconds=5)
def push(root: str) -> str:
    return _versions.push(Path(root))


@flow(name="ul", log_prints=True, validate_parameters=True, on_cancellation=[stop_jobs_on_cancel])
def ul(params: str = "params.yaml", overrides: list[str] = []) -> dict[str, Any]:  # noqa: B006
    """The whole Unified Latents pipeline: raw-data manifest, shard, FID references, stage 1, encode, stage 2,
    evaluate, promote."""
    logger = get_run_logger()
    cfg = load(params, overrides)  # bad params fail here, before any stage starts
    root, reason = _versions.recording_blocker(cfg, STAGES)
    if root is None:
        logger.info("DVC versions will not be recorded: %s", reason)
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    with flow_run_lineage(), tracking.pipeline_run(cfg) as parent_run:
        for stage in STAGES:
            start = time.perf_counter()
            if root is not None and up_to_date(str(root), stage):
                logger.info("stage %s is up to date in dvc.lock: skipped", stage)
                results[stage] = {"skipped": "up to date in dvc.lock"}
            else:
                with temporary_settings(updates=SUBFLOW_SETTINGS):
                    results[stage] = SUBFLOWS[stage](params=params, overrides=list(overrides))
                if root is not None:
                    record(str(root), stage)
            timings[stage] = time.perf_counter() - start
        pushed = "no DVC remote configured"
        if root is not None and _versions.has_remote(root):
            pushed = push(str(root))
        elif root is None:
            pushed = "versions not recorded"
        tracking.log_metrics(parent_run, {f"time_s.{s}": t for s, t in timings.items()}, step=0)
        metrics = results.get("evaluate") or {}
        tracking.log_metrics(parent_run, {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=0)
    summary = {"mlflow_run_id": parent_run, "dvc": reason or "versions recorded in dvc.lock", "dvc_push": pushed,
               **{f"{s}_s": round(t, 1) for s, t in timings.items()}}
    publish_summary("pipeline", summary_markdown("pipeline", {**summary, "stages": results}, [
        ("pipeline", parent_run, tracking.run_url(parent_run, tracking.tracking_uri(cfg)))], cfg))
    return {**summary, "stages": results}


if __name__ == "__main__":
    from flows._cli import main

    main(ul, services=True)
