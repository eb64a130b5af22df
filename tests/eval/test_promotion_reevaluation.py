"""A champion measured under another protocol is evaluated again, from its registered nets, before the gate compares
(tiny random-weight models, real image shards, real FID network, real MLflow registry)."""

from __future__ import annotations

import pytest
import torch

from tests.promotion_kit import champion_versions, promotion_config
from ulcore import layout, promotion, storage, tracking

from .conftest import write_image_shards

pytestmark = pytest.mark.slow
EVAL = ["eval.num_samples=4", "eval.batch_size=3", "eval.base_steps=2", "eval.decoder_steps=2", "eval.grid_size=4",
        "eval.reference_samples=0"]


def _export(cfg, run_id: str, stage1_run: str, stage: str, nets: dict, root: str) -> dict[str, str]:
    """What a training stage leaves behind: exported nets, registered with their lineage, and the done marker."""
    from ulcore.models import export_modules

    files = export_modules(nets, cfg, root)
    registered = {net: tracking.register_model(run_id, promotion.model_name(cfg, net), {"weights": path},
                                               cfg.tracking.candidate_alias, cfg.to_yaml(),
                                               tags={tracking.STAGE1_RUN_TAG: stage1_run})
                  for net, path in files.items()}
    storage.write_json(layout.done_marker(cfg.storage.root, stage),
                       {"digest": f"{stage}-{run_id}", "mlflow_run_id": run_id, "registered": registered,
                        tracking.STAGE1_RUN_TAG: stage1_run})
    return registered


def _train(cfg, seed: int) -> promotion.Lineage:
    """Stages 1 and 2 with random-weight tiny nets."""
    from ulcore.models import stage1_root, stage2_root
    from ulcore.nets import build_base_model, build_decoder, build_encoder, build_prior

    torch.manual_seed(seed)
    m = cfg.model
    with tracking.stage_run(cfg, "stage1") as stage1_run:
        versions = _export(cfg, stage1_run, stage1_run, "stage1", {"encoder": build_encoder(m),
                           "decoder": build_decoder(m), "prior": build_prior(m)}, stage1_root(cfg))
    with tracking.stage_run(cfg, "stage2") as stage2_run:
        versions.update(_export(cfg, stage2_run, stage1_run, "stage2", {"base": build_base_model(m)},
                                stage2_root(cfg)))
    return promotion.Lineage(stage1_run, versions)


def test_champion_under_another_protocol_is_reevaluated_then_judged(tmp_path, gray_images, monkeypatch):
    from ulcore.eval.evaluate import locations, measure, run_evaluate

    for var in ("MLFLOW_TRACKING_URI", tracking.PARENT_ENV, tracking.FLOW_RUN_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    first = promotion_config(tmp_path / "root", tmp_path, *EVAL)
    write_image_shards(first, gray_images)
    champion = _train(first, seed=0)
    evaluated = run_evaluate(first)
    assert evaluated["lineage"]["versions"] == champion.versions
    assert promotion.run_promote(first)["promoted"] and champion_versions(first) == champion.versions
    assert promotion.recorded_metrics(first, champion)[1] == evaluated["protocol_digest"]

    # another protocol (other seeds): what the champion's exported nets score under it, evaluated here directly
    second = promotion_config(tmp_path / "root", tmp_path, *EVAL, "eval.seed=99",  # the same registry
                              f"tracking.model_prefix={first.tracking.model_prefix}",
                              f"tracking.experiment={first.tracking.experiment}")
    expected = measure(second, locations(second)).result
    assert expected["protocol_digest"] != evaluated["protocol_digest"]

    candidate = _train(second, seed=1)
    judged = run_evaluate(second)
    assert judged["protocol_digest"] == expected["protocol_digest"]
    result = promotion.run_promote(second)
    assert f"champion re-evaluated under protocol {expected['protocol_digest']}" in result["reason"]
    assert result["champion"]["gfid"] == pytest.approx(expected["gfid"], rel=1e-5)
    assert result["champion"]["psnr"] == pytest.approx(expected["psnr"], rel=1e-5)
    assert result["candidate"]["gfid"] == pytest.approx(judged["gfid"])
    metrics, protocol = promotion.recorded_metrics(second, champion)  # later gates on this protocol reuse them
    assert protocol == expected["protocol_digest"] and metrics["gfid"] == pytest.approx(expected["gfid"], rel=1e-5)
    moved = champion_versions(second)
    assert moved == (candidate.versions if result["promoted"] else champion.versions)
