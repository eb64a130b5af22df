"""The `ul-promote` flow around the real promote stage (real Prefect API, real MLflow store)."""

from __future__ import annotations

import pytest
import yaml

from tests.promotion_kit import champion_versions, promotion_config, register_lineage, write_eval

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_promote_flow_moves_the_champion_and_publishes_the_decision(tmp_path, monkeypatch):
    from prefect.artifacts import Artifact

    from flows.promote import promote
    from ulcore import layout, storage, tracking

    for var in ("MLFLOW_TRACKING_URI", tracking.PARENT_ENV, tracking.FLOW_RUN_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = promotion_config(tmp_path / "root", tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    lineage = register_lineage(cfg)
    write_eval(cfg, lineage.versions, gfid=12.0, psnr=22.0)

    assert promote.name == "ul-promote"
    state = promote(return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["promoted"] is True and champion_versions(cfg) == lineage.versions
    assert storage.read_json(layout.metrics(cfg.storage.root, "promotion"))["candidate"]["gfid"] == 12.0
    run = tracking.client(tracking.tracking_uri(cfg)).get_run(result["mlflow_run_id"])
    assert run.data.tags["prefect_flow_run_id"] == str(state.state_details.flow_run_id)
    assert run.data.tags["promotion.promoted"] == "true"
    artifact = Artifact.get("ul-promote")
    assert artifact is not None and "**promoted**: first promotion" in artifact.data
