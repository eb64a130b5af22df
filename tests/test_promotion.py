"""Evaluate, then promote: the gate on hand-computed cases, the champion of four nets moving together against a real
MLflow store (SQLite), mixed lineages refused, protocols compared, promotion by hand and rollbacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.promotion_kit import (champion_versions, promotion_config, promotion_runs, register_lineage, stage2_run,
                                 write_eval)
from ulcore import cli, layout, promotion, storage, tracking
from ulcore.config import PromoteConfig
from ulcore.errors import LineageError

REPO = Path(__file__).resolve().parents[1]
GATE = PromoteConfig(metric="gfid", min_improvement=0.02, guards={"psnr": 0.2})


# ---------------------------------------------------------------------------------------------- the gate


def test_better_by_the_margin_with_guards_kept_promotes():
    # gFID 30 -> 29: (30 - 29) / 30 = 3.33 % lower >= 2 %; PSNR 21.0 -> 20.9: 0.1 dB worse <= 0.2
    d = promotion.gate(GATE, {"gfid": 29.0, "psnr": 20.9}, {"gfid": 30.0, "psnr": 21.0})
    assert d.promoted
    assert "gfid 29 vs champion 30: 3.33% better, promotion needs >= 2.00% better (lower)" in d.reason
    assert "guard psnr 20.9 vs champion 21: 0.1 worse, at most 0.2 allowed" in d.reason


def test_insufficient_margin_and_worse_are_rejected_naming_metric_and_values():
    # 0.5 / 30 = 1.67 % < 2 %
    d = promotion.gate(GATE, {"gfid": 29.5, "psnr": 21.0}, {"gfid": 30.0, "psnr": 21.0})
    assert not d.promoted and d.reason.startswith("rejected: gfid 29.5 vs champion 30: 1.67% better")
    d = promotion.gate(GATE, {"gfid": 31.0, "psnr": 22.0}, {"gfid": 30.0, "psnr": 21.0})
    assert not d.promoted and "gfid 31 vs champion 30: 3.33% worse" in d.reason
    d = promotion.gate(GATE, {"gfid": 30.0, "psnr": 21.0}, {"gfid": 30.0, "psnr": 21.0})
    assert not d.promoted and "0.00% equal" in d.reason


def test_guard_violated_is_rejected_even_when_the_metric_improves():
    # gFID 10 % lower, but PSNR 0.3 dB lower > 0.2 allowed
    d = promotion.gate(GATE, {"gfid": 27.0, "psnr": 20.7}, {"gfid": 30.0, "psnr": 21.0})
    assert not d.promoted
    assert d.reason.startswith("rejected: guard psnr 20.7 vs champion 21: 0.3 worse, at most 0.2 allowed")


def test_higher_is_better_metrics_and_missing_numbers():
    up = PromoteConfig(metric="psnr", min_improvement=0.01, guards={"gfid": 1.0})
    # PSNR 21 -> 21.3: 0.3 / 21 = 1.43 % higher >= 1 %; gFID 30 -> 30.5: 0.5 worse <= 1
    assert promotion.gate(up, {"psnr": 21.3, "gfid": 30.5}, {"psnr": 21.0, "gfid": 30.0}).promoted
    assert not promotion.gate(up, {"psnr": 21.3, "gfid": 31.5}, {"psnr": 21.0, "gfid": 30.0}).promoted
    d = promotion.gate(GATE, {"gfid": None, "psnr": 21.0}, {"gfid": 30.0, "psnr": 21.0})
    assert not d.promoted and d.reason == "the candidate has no gfid to compare (got None)"


def test_no_champion_promotes():
    d = promotion.gate(GATE, {"gfid": 99.0}, None)
    assert d.promoted and d.reason == "first promotion: there is no champion yet"


# ---------------------------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("store")


@pytest.fixture()
def cfg(tmp_path, store, monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", tracking.PARENT_ENV, tracking.FLOW_RUN_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return promotion_config(tmp_path / "root", store)


def _promotion_json(cfg) -> dict:
    return storage.read_json(layout.metrics(cfg.storage.root, "promotion"))


def test_first_run_promotes_all_four_and_a_rerun_does_nothing(cfg):
    a = register_lineage(cfg)
    write_eval(cfg, a.versions, gfid=30.0, psnr=21.0)
    result = promotion.run_promote(cfg)
    doc = _promotion_json(cfg)
    assert doc == {"promoted": True, "reason": "first promotion: there is no champion yet",
                   "candidate": {"gfid": 30.0, "psnr": 21.0, "rfid": 5.0}, "champion": None}
    assert set(doc) == {"promoted", "reason", "candidate", "champion"}
    assert champion_versions(cfg) == a.versions
    (run,) = promotion_runs(cfg)
    assert run.info.run_id == result["mlflow_run_id"] and run.info.run_name == "promotion: promoted (gate)"
    assert run.data.tags["promotion.promoted"] == "true" and json.loads(run.data.tags["promotion.candidate"]) == {
        "stage1_run_id": a.stage1_run_id, "versions": a.versions}
    assert run.data.metrics["candidate.gfid"] == 30.0
    tags = promotion.recorded_metrics(cfg, a)
    assert tags == ({"gfid": 30.0, "psnr": 21.0, "rfid": 5.0}, "p1")

    again = promotion.run_promote(cfg)
    assert again["skipped"] is True and again["promoted"] is True
    assert len(promotion_runs(cfg)) == 1 and champion_versions(cfg) == a.versions


def test_gate_sequence_moves_the_four_nets_together_and_rollback_walks_back(cfg):
    a = register_lineage(cfg)
    write_eval(cfg, a.versions, gfid=30.0, psnr=21.0)
    assert promotion.run_promote(cfg)["promoted"]

    b = register_lineage(cfg)  # 1 % better: not enough (the default gate asks for 5 %)
    write_eval(cfg, b.versions, gfid=29.7, psnr=21.0)
    assert not promotion.run_promote(cfg)["promoted"]
    doc = _promotion_json(cfg)
    assert doc["reason"].startswith("rejected: gfid 29.7 vs champion 30: 1.00% better, promotion needs >= 5.00%")
    assert doc["champion"] == {"gfid": 30.0, "psnr": 21.0, "rfid": 5.0} and doc["candidate"]["gfid"] == 29.7
    assert champion_versions(cfg) == a.versions
    c = tracking.client(tracking.tracking_uri(cfg))
    base_b = c.get_model_version(promotion.model_name(cfg, "base"), b.versions["base"])
    assert base_b.tags["promotion.decision"] == "rejected" and base_b.tags["promotion.reason"] == doc["reason"]
    assert base_b.tags["promotion.run_id"] == promotion_runs(cfg)[-1].info.run_id
    assert promotion_runs(cfg)[-1].info.run_name == "promotion: rejected (gate)"

    guard = register_lineage(cfg)  # 10 % better gFID, PSNR 0.3 dB lower
    write_eval(cfg, guard.versions, gfid=27.0, psnr=20.7)
    assert not promotion.run_promote(cfg)["promoted"]
    assert "guard psnr 20.7 vs champion 21: 0.3 worse" in _promotion_json(cfg)["reason"]

    d = register_lineage(cfg)
    write_eval(cfg, d.versions, gfid=27.0, psnr=20.9)
    assert promotion.run_promote(cfg)["promoted"]
    assert champion_versions(cfg) == d.versions and _promotion_json(cfg)["champion"]["gfid"] == 30.0

    restored = promotion.rollback(cfg)
    assert champion_versions(cfg) == a.versions and restored["reason"].startswith("rollback: ")
    assert promotion_runs(cfg)[-1].data.tags["promotion.kind"] == "rollback"
    with pytest.raises(LineageError, match="nothing to roll back to: the champion stage-1 run"):
        promotion.rollback(cfg)
    assert champion_versions(cfg) == a.versions


def test_mixed_lineage_is_refused(cfg):
    a = register_lineage(cfg)
    b = register_lineage(cfg)
    write_eval(cfg, a.versions, gfid=30.0, psnr=21.0)
    promotion.run_promote(cfg)
    mixed = {**b.versions, "base": a.versions["base"]}  # b's stage-1 nets, a base trained on a's latents
    with pytest.raises(LineageError, match=f"base v{a.versions['base']} was trained on the latents of stage-1 run "
                                           f"{a.stage1_run_id}"):
        promotion.lineage_of(cfg, mixed)
    with pytest.raises(LineageError, match="mixed lineage: encoder v"):
        promotion.lineage_of(cfg, {**a.versions, "decoder": b.versions["decoder"]})
    with pytest.raises(LineageError, match=r"t.*-prior v99 is not in the registry"):
        promotion.lineage_of(cfg, {**a.versions, "prior": "99"})
    write_eval(cfg, mixed, gfid=10.0, psnr=30.0)
    assert not promotion.run_promote(cfg)["promoted"]
    assert _promotion_json(cfg)["reason"].startswith("refused: mixed lineage")
    assert champion_versions(cfg) == a.versions


def test_a_champion_that_cannot_be_reevaluated_under_a_new_protocol_refuses(cfg):
    """Versions registered before lineages were recorded, champion set by that version's training: their numbers
    (none) are not on this protocol and the lineage cannot be checked, so nothing moves and the reason says why."""
    legacy = register_lineage(cfg, tagged=False)
    c = tracking.client(tracking.tracking_uri(cfg))
    for net, version in legacy.versions.items():
        c.set_registered_model_alias(promotion.model_name(cfg, net), cfg.tracking.champion_alias, version)
    new = register_lineage(cfg)
    write_eval(cfg, new.versions, gfid=20.0, psnr=25.0, protocol="p2")
    assert not promotion.run_promote(cfg)["promoted"]
    reason = _promotion_json(cfg)["reason"]
    assert reason.startswith("refused: the champion's metrics were recorded under protocol none, this evaluation's "
                             "is p2, and the champion cannot be re-evaluated")
    assert "unified-latents promote --run ID" in reason and champion_versions(cfg) == legacy.versions


def test_promote_by_hand_then_rollback_through_the_cli(cfg, capsys):
    a = register_lineage(cfg)
    write_eval(cfg, a.versions, gfid=30.0, psnr=21.0)
    promotion.run_promote(cfg)
    b = register_lineage(cfg)
    write_eval(cfg, b.versions, gfid=35.0, psnr=21.0)
    assert not promotion.run_promote(cfg)["promoted"]
    args = ["--params", str(REPO / "params.yaml"), "--set", f"storage.root={cfg.storage.root}",
            "--set", f"tracking.uri={cfg.tracking.uri}", "--set", f"tracking.model_prefix={cfg.tracking.model_prefix}",
            "--set", f"tracking.experiment={cfg.tracking.experiment}"]

    assert cli.main(["promote", "--run", stage2_run(cfg, b), *args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["reason"] == "manual" and out["candidate"]["gfid"] == 35.0 and out["champion"]["gfid"] == 30.0
    assert champion_versions(cfg) == b.versions
    assert promotion_runs(cfg)[-1].info.run_name == "promotion: promoted (manual)"
    assert cli.main(["promote", "--run", stage2_run(cfg, b), *args]) == 1
    assert "is already the champion" in capsys.readouterr().err

    assert cli.main(["rollback", *args]) == 0
    capsys.readouterr()
    assert champion_versions(cfg) == a.versions
    assert cli.main(["rollback", *args]) == 1
    assert "nothing to roll back to" in capsys.readouterr().err

    # a stage-1 run's lineage: its nets with the newest base model trained on its latents
    b2 = register_lineage(cfg, stage1_run=b.stage1_run_id)
    assert promotion.lineage_of_run(cfg, b.stage1_run_id).versions == b2.versions
    assert promotion.promote_run(cfg, b.stage1_run_id)["reason"] == "manual"
    assert champion_versions(cfg) == b2.versions
    with pytest.raises(LineageError, match="run nope: no t.*-base version from it or trained on its latents"):
        promotion.lineage_of_run(cfg, "nope")


def test_no_champion_nothing_to_roll_back(cfg):
    with pytest.raises(LineageError, match="nothing to roll back: no .* version carries the alias 'champion'"):
        promotion.rollback(cfg)


def test_stage2_lineage_is_the_stage1_run_whose_encoder_made_the_latents(tmp_path):
    from ulcore.config import load_config
    from ulcore.train.stage2 import encoder_run

    cfg = load_config(None, [f"storage.root={tmp_path}"])
    storage.write_json(layout.done_marker(str(tmp_path), "stage1"), {"digest": "d1", "mlflow_run_id": "run-1"})
    storage.write_json(layout.latents_stats(str(tmp_path)), {"encoder": "d1", "splits": {}})
    assert encoder_run(cfg) == "run-1"
    storage.write_json(layout.done_marker(str(tmp_path), "stage1"), {"digest": "d2", "mlflow_run_id": "run-2"})
    with pytest.raises(LineageError, match="latents were encoded by stage-1 export d1, but .* records d2: rerun "
                                           "the encode stage"):
        encoder_run(cfg)


def test_the_promote_stage_follows_evaluate_in_dvc_yaml():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages)[-2:] == ["evaluate", "promote"]
    promote = stages["promote"]
    assert promote["cmd"] == "python -m flows.promote" and "metrics/eval.json" in promote["deps"]
    assert promote["metrics"] == [{"metrics/promotion.json": {"cache": False}}] and "promote" in promote["params"]
