"""`ul-study` end to end at smoke scale: real stages, a real SQLite MLflow store, the Prefect test harness. Two
settings (one trains stage 2); the report has a verdict per trend, MLflow one parent run with a child per setting;
a rerun reuses both settings' numbers under a new parent."""

from __future__ import annotations

import pytest
from flowkit import smoke_params_yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def test_study_reports_verdicts_and_nests_a_child_run_per_setting(tmp_path, prefect_harness, local_ray, monkeypatch):
    from mlflow.tracking import MlflowClient

    from flows.study import study

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = tmp_path / "params.yaml"
    params.write_text(smoke_params_yaml(["eval.reference_samples=32"]))
    overrides = [f"storage.root={tmp_path}"]
    result = study(params=str(params), overrides=overrides, quick=False, loss_factors=[1.5, 3.0], logsnr_0s=[5.0, 10.0])
    # the smoke config's c_lf is 3: settings (1.5, 5), (3, 5) with stage 2, (3, 10)
    assert result["settings"] == {"clf1.5_lambda5": "ran", "clf3_lambda5": "ran", "clf3_lambda10": "ran"}
    text = (tmp_path / "reports" / "study.md").read_text()
    for verdict in result["verdicts"]:
        assert f"**{verdict['claim']}** — {verdict['text']}" in text
        assert not verdict["text"].startswith("not measured"), verdict
    for name in ("study_rate_distortion.png", "study_rate_fid.png", "study.csv"):
        assert (tmp_path / "reports" / name).is_file(), name
    shared = tmp_path / "runs" / "study" / "shared" / "data"
    assert sorted(p.name for p in (shared / "fid_refs").glob("*.npz")) == sorted(  # computed once, in shared/
        p.name for p in (tmp_path / "runs" / "study" / "full" / "clf1.5_lambda5" / "data" / "fid_refs").glob("*.npz"))

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.get_experiment_by_name("unified-latents-study")
    runs = c.search_runs([exp.experiment_id], max_results=200)
    by_id = {r.info.run_id: r for r in runs}
    parent = by_id[result["mlflow_run_id"]]
    assert parent.data.tags["stage"] == "study" and parent.info.status == "FINISHED"
    assert {a.path for a in c.list_artifacts(parent.info.run_id, "report")} >= {"report/study.md",
                                                                              "report/study_rate_fid.png"}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                and r.data.tags["stage"] == "study-setting"]
    assert sorted(r.data.tags["study.setting"] for r in children) == sorted(result["settings"])
    for child in children:
        assert {"psnr", "bits_per_pixel_prior", "rfid", "gfid_prior"} <= set(child.data.metrics)
        nested = {r.data.tags["stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == child.info.run_id}
        assert nested == ({"stage1", "stage2", "evaluate"} if child.data.tags["study.setting"] == "clf3_lambda5"
                          else {"stage1", "evaluate"})
    assert {m.name for m in c.search_registered_models()} >= {"ul-study-encoder", "ul-study-base"}
    assert not {m.name for m in c.search_registered_models()} & {"ul-encoder", "ul-base"}

    again = study(params=str(params), overrides=overrides, quick=False, loss_factors=[1.5, 3.0], logsnr_0s=[5.0, 10.0])
    assert set(again["settings"].values()) == {"reused"} and again["verdicts"] == result["verdicts"]
    reruns = [r for r in c.search_runs([exp.experiment_id], max_results=200)
              if r.data.tags.get("mlflow.parentRunId") == again["mlflow_run_id"]]
    assert sorted(r.data.tags["study.reused_from"] for r in reruns) == sorted(r.info.run_id for r in children)
