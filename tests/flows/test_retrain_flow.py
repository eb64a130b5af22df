"""The retrain flow (deployment `ul-retrain/scheduled-retrain`): the real `ul` flow with the real raw_manifest and
shard stages and counting stand-ins after them, on a raw tree that grows. It runs when the raw data changed or
when forced, skips otherwise, reruns the pipeline after an infrastructure failure only, and records the raw digest
of a finished retrain; `warm_start` turns on the warm start of both training stages for its run."""

from __future__ import annotations

import pytest

from flowkit import RAW_CLASS as A
from flowkit import copy_project, raw_image, raw_tree, smoke_params_yaml, stage_calls

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _init_from(project) -> dict[str, list[str]]:
    """`<stage>.init_from` of each training stage's MLflow runs, oldest first (the stand-ins log the params too)."""
    from ulcore import tracking
    from ulcore.config import load_config

    cfg = load_config(project / "params.yaml", [])
    c = tracking.client(tracking.tracking_uri(cfg))
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    oldest_first = ["attributes.start_time ASC"]
    return {stage: [r.data.params[f"{stage}.init_from"] for r in
                    c.search_runs([exp.experiment_id], f"tags.stage = '{stage}'", order_by=oldest_first)]
            for stage in ("stage1", "stage2")}


def test_which_failures_a_rerun_can_fix():
    import requests

    from flows.retrain import infrastructure_failure
    from ulcore.jobs import JobFailed
    from ulcore.storage import StorageUnreachable

    def chained(outer: Exception, inner: Exception) -> Exception:
        try:
            raise outer from inner
        except Exception as exc:  # noqa: BLE001
            return exc

    assert infrastructure_failure(StorageUnreachable("S3 endpoint http://x unreachable"))
    assert infrastructure_failure(chained(RuntimeError("stage failed"), ConnectionResetError("reset by peer")))
    assert infrastructure_failure(requests.exceptions.ConnectionError("head gone"))
    assert infrastructure_failure(JobFailed("j", "FAILED", "Job supervisor actor died: the node was lost"))
    assert not infrastructure_failure(JobFailed("j", "FAILED", "Job entrypoint command failed with exit code 1"))
    assert not infrastructure_failure(JobFailed("j", "STOPPED", "stopped by the user"))
    assert not infrastructure_failure(ValueError("stage1.batch_size=0: expected > 0"))
    assert not infrastructure_failure(chained(RuntimeError("NaN loss"), KeyError("x")))


@pytest.mark.slow  # five pipeline runs through DVC: ~2 min on a busy 2-core machine
def test_retrain_runs_on_new_raw_data_or_when_forced_and_retries_only_infrastructure_failures(
        tmp_path, monkeypatch, stand_ins_after_shard):
    import dataclasses

    from flows.retrain import marker_uri, retrain
    from ulcore import stages, storage
    from ulcore.config import load_config

    raw = tmp_path / "raw"
    raw_tree(raw)
    project = copy_project(tmp_path / "proj", smoke_params_yaml(
        ["data.source=imagenet", f"data.root={raw}", "data.resolution=16", "shard.samples_per_shard=2"]))
    monkeypatch.chdir(project)
    marker = marker_uri(load_config(project / "params.yaml", []))
    quick = {"retry_delay_s": 0.0}

    first = retrain(**quick)
    assert first["why"].startswith("no finished retrain recorded yet") and first["attempts"] == 1
    assert stage_calls(project) == ["reference", "stage1", "encode", "stage2", "evaluate", "promote"]
    digest = storage.read_json(str(marker))["raw_digest"]

    unchanged = retrain(**quick)
    assert unchanged["skipped"].startswith("raw data unchanged since the retrain of") and stage_calls(project) == []

    raw_image(raw / A / "a4.JPEG", 5)
    grown = retrain(warm_start=True, **quick)
    assert grown["why"].startswith("raw data changed: 1 added, 0 changed, 0 removed")
    assert grown["pipeline"]["stages"]["shard"]["run"]["shards_built"] == 1
    assert storage.read_json(str(marker))["raw_digest"] != digest
    assert _init_from(project) == {"stage1": ["none", "champion"], "stage2": ["none", "champion"]}

    stage2 = stages.BY_NAME["stage2"]
    failures = iter([storage.StorageUnreachable("S3 endpoint http://127.0.0.1:9 unreachable (injected)")])

    def flaky_once(cfg):
        if (exc := next(failures, None)) is not None:
            raise exc
        return stage2.run(cfg)

    monkeypatch.setitem(stages.BY_NAME, "stage2", dataclasses.replace(stage2, run=flaky_once))
    monkeypatch.setenv("UL_FAKE_FAIL", "")
    stage_calls(project)
    (project / "params.yaml").write_text(smoke_params_yaml(
        ["data.source=imagenet", f"data.root={raw}", "data.resolution=16", "shard.samples_per_shard=2",
         "stage2.total_samples=192"]))  # something for stage 2 to do
    forced = retrain(force=True, **quick)
    assert forced["why"].startswith("raw data unchanged") and forced["attempts"] == 2
    assert stage_calls(project).count("stage2") == 1  # the injected failure ran before the stand-in counted

    monkeypatch.setenv("UL_FAKE_FAIL", "evaluate")
    (project / "params.yaml").write_text(smoke_params_yaml(
        ["data.source=imagenet", f"data.root={raw}", "data.resolution=16", "shard.samples_per_shard=2",
         "stage2.total_samples=192", "eval.num_samples=16"]))
    broken = retrain(force=True, return_state=True, **quick)
    assert broken.is_failed() and "fake failure in evaluate" in broken.message
    assert stage_calls(project).count("evaluate") == 1, "a failure of the stage itself is not retried"
