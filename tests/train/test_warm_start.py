"""Warm start from the champion (`stage1.init_from` / `stage2.init_from`), against a real MLflow store (SQLite) whose
champion is four registered nets of one lineage with known weights: the nets and their EMA copies start from them,
a checkpoint of the run wins over them, no champion is a cold start, a champion with other nets is a ConfigError
naming the knob, and the champion's versions are part of the run's identity."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.smoke import SMOKE
from ulcore import tracking
from ulcore.config import ConfigError, load_config
from ulcore.errors import LineageError
from ulcore.models import export_modules
from ulcore.nets import build_base_model, build_decoder, build_encoder, build_prior
from ulcore.promotion import Lineage, model_name, move_champion
from ulcore.train import warm_start
from ulcore.train.checkpoint import Progress, save_state
from ulcore.train.clipping import GradClipper
from ulcore.train.ema import EMA
from ulcore.train.loop import run_digest
from ulcore.train.stage1 import SPEC as STAGE1, Stage1Objective, inputs_digest, run_stage1
from ulcore.train.stage2 import Stage2Objective

WARM = ["stage1.init_from=champion", "stage2.init_from=champion"]


def _config(root: Path, store: Path, prefix: str, *extra: str):
    return load_config(None, [*SMOKE, f"storage.root={root}", f"tracking.uri=sqlite:///{store}/mlflow.db",
                              f"tracking.model_prefix={prefix}", f"tracking.experiment=warm-{prefix}", *extra])


def _nets(cfg, seed: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    m = cfg.model
    return {"encoder": build_encoder(m), "decoder": build_decoder(m), "prior": build_prior(m),
            "base": build_base_model(m)}


def _register_champion(cfg, nets: dict[str, torch.nn.Module], tmp: Path) -> Lineage:
    """What stage 1, stage 2 and a promotion leave in the registry: four versions of one lineage, champion."""
    files = export_modules(nets, cfg, str(tmp / "export"))
    versions = {}
    with tracking.stage_run(cfg, "stage1") as stage1_run:
        for net in ("encoder", "decoder", "prior"):
            versions[net] = tracking.register_model(stage1_run, model_name(cfg, net), {"weights": files[net]},
                                                    cfg.tracking.candidate_alias, cfg.to_yaml(),
                                                    tags={tracking.STAGE1_RUN_TAG: stage1_run})
    with tracking.stage_run(cfg, "stage2") as stage2_run:
        versions["base"] = tracking.register_model(stage2_run, model_name(cfg, "base"), {"weights": files["base"]},
                                                   cfg.tracking.candidate_alias, cfg.to_yaml(),
                                                   tags={tracking.STAGE1_RUN_TAG: stage1_run})
    lineage = Lineage(stage1_run, versions)
    move_champion(cfg, lineage, None)
    return lineage


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A SQLite store whose champion (model prefix `prefix`) holds nets built with seed 1234 at smoke scale."""
    tmp = tmp_path_factory.mktemp("warm")
    prefix = f"w{uuid.uuid4().hex[:8]}"
    cfg = _config(tmp / "root", tmp, prefix, *WARM)
    nets = _nets(cfg, seed=1234)
    lineage = _register_champion(cfg, nets, tmp)
    return {"tmp": tmp, "prefix": prefix, "cfg": cfg, "lineage": lineage,
            "weights": {name: {k: v.clone() for k, v in net.state_dict().items()} for name, net in nets.items()}}


def _equal(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> bool:
    state = module.state_dict()
    return state.keys() == weights.keys() and all(torch.equal(state[k].float(), weights[k]) for k in state)


def test_stage1_and_stage2_nets_and_their_ema_start_from_the_champion(registry):
    cfg, lineage, weights = registry["cfg"], registry["lineage"], registry["weights"]
    warm = warm_start.resolve(cfg, "stage1")
    assert warm.stage1_run_id == lineage.stage1_run_id
    assert warm.tags() == {**{f"warm_start.{n}": f"{model_name(cfg, n)} v{lineage.versions[n]}"
                              for n in ("encoder", "decoder", "prior")},
                           "warm_start.stage1_run_id": lineage.stage1_run_id}
    torch.manual_seed(0)
    objective = Stage1Objective(cfg)
    assert not _equal(objective.encoder, weights["encoder"])  # the random init is not the champion's
    warm_start.initialise(objective, warm, cfg, tracking.tracking_uri(cfg))
    ema = EMA(objective, cfg.stage1.ema_halflife_samples)
    for net in ("encoder", "decoder", "prior"):
        assert _equal(getattr(objective, net), weights[net]), net
        assert _equal(getattr(ema.module, net), weights[net]), net

    base = warm_start.resolve(cfg, "stage2")
    assert base.versions == {"base": (model_name(cfg, "base"), lineage.versions["base"])}
    objective = Stage2Objective(cfg)
    warm_start.initialise(objective, base, cfg, tracking.tracking_uri(cfg))
    assert _equal(objective.base, weights["base"])


def test_a_champion_with_other_nets_is_a_config_error_naming_the_knob_and_the_difference(registry):
    cfg = _config(registry["tmp"] / "root", registry["tmp"], registry["prefix"], *WARM, "model.prior_width=32")
    warm = warm_start.resolve(cfg, "stage1")
    with pytest.raises(ConfigError) as err:
        warm_start.initialise(Stage1Objective(cfg), warm, cfg, tracking.tracking_uri(cfg))
    prior = f"{model_name(cfg, 'prior')} v{registry['lineage'].versions['prior']}"
    assert str(err.value) == (f"stage1.init_from = champion: {prior} does not fit this run's prior: it was trained "
                              "with model.prior_width = 64 (this run: 32). Set the model section to the champion's, "
                              "or stage1.init_from = none")


def test_the_log_and_the_run_say_what_training_starts_from(registry, capsys):
    cfg, lineage = registry["cfg"], registry["lineage"]
    base = warm_start.resolve(cfg, "stage2")
    with tracking.stage_run(cfg, "stage2") as run_id:
        warm_start.announce(cfg, "stage2", base, run_id, latents_of=lineage.stage1_run_id)
        same = capsys.readouterr().out
        warm_start.announce(cfg, "stage2", base, run_id, latents_of="a-later-stage1-run")
        other = capsys.readouterr().out
    version = f"{model_name(cfg, 'base')} v{lineage.versions['base']}"
    assert f"[stage2] warm start (stage2.init_from = champion): {version} (the champion: lineage" in same
    assert "note:" not in same
    assert (f"note: the champion's base model was trained on the latents of stage-1 run {lineage.stage1_run_id}, "
            "these come from stage-1 run a-later-stage1-run") in other
    tags = tracking.client(tracking.tracking_uri(cfg)).get_run(run_id).data.tags
    assert tags["warm_start.base"] == version and tags["warm_start.stage1_run_id"] == lineage.stage1_run_id


def test_a_champion_of_two_lineages_is_refused_naming_the_knob(registry):
    cfg = _config(registry["tmp"] / "mixed", registry["tmp"], f"w{uuid.uuid4().hex[:8]}", *WARM)
    first = _register_champion(cfg, _nets(cfg, seed=1), registry["tmp"] / "first")
    second = _register_champion(cfg, _nets(cfg, seed=2), registry["tmp"] / "second")
    c = tracking.client(tracking.tracking_uri(cfg))
    c.set_registered_model_alias(model_name(cfg, "encoder"), "champion", first.versions["encoder"])  # by hand
    with pytest.raises(LineageError) as err:
        warm_start.resolve(cfg, "stage1")
    assert str(err.value).startswith("stage1.init_from = champion: the champion's versions are not one lineage "
                                     f"(mixed lineage: encoder v{first.versions['encoder']} comes from stage-1 run "
                                     f"{first.stage1_run_id}, decoder v{second.versions['decoder']}")


def test_no_champion_yet_is_a_cold_start_said_on_the_log_and_the_run(registry, capsys):
    cfg = _config(registry["tmp"] / "other", registry["tmp"], f"w{uuid.uuid4().hex[:8]}", *WARM)
    assert warm_start.resolve(cfg, "stage1") is None
    with tracking.stage_run(cfg, "stage1") as run_id:
        warm_start.announce(cfg, "stage1", None, run_id)
    assert (f"[stage1] stage1.init_from = champion, but no {cfg.tracking.model_prefix}-* version carries the alias "
            "'champion' yet: cold start (the first run)") in capsys.readouterr().out
    run = tracking.client(tracking.tracking_uri(cfg)).get_run(run_id)
    assert run.data.tags["warm_start"] == warm_start.NO_CHAMPION_TAG
    cold = load_config(None, [*SMOKE])
    assert run_digest(cfg, STAGE1, "data", None) == run_digest(cold, STAGE1, "data", None)  # a cold run's identity


def test_the_champion_versions_are_part_of_the_identity(registry):
    cfg = registry["cfg"]
    warm = warm_start.resolve(cfg, "stage1")
    cold = run_digest(load_config(None, [*SMOKE]), STAGE1, "data")
    assert run_digest(cfg, STAGE1, "data", warm) != cold
    other = warm_start.WarmStart("stage1", "another-run", {n: (name, str(int(v) + 1))
                                                          for n, (name, v) in warm.versions.items()})
    assert run_digest(cfg, STAGE1, "data", other) != run_digest(cfg, STAGE1, "data", warm)


# lr 1e-30: the one step taken moves no weight by more than ~1e-29 (zero-initialised ones become that small), so the
# exported EMA nets are what training started from
STILL = ["stage1.lr=1e-30", "stage1.batch_size=16", "stage1.warmup_samples=0", "stage1.log_every_samples=16",
         "stage1.ckpt_every_samples=16"]


def _exported(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {net: load_file(str(root / "models" / "stage1" / f"{net}.safetensors"))
            for net in ("encoder", "decoder", "prior")}


def _same(exported: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> bool:
    return exported.keys() == weights.keys() and all(
        torch.allclose(exported[k], weights[k].float(), rtol=0.0, atol=1e-12) for k in weights)


@pytest.mark.slow
def test_a_warm_stage1_run_starts_from_the_champion_and_a_checkpoint_wins_over_it(registry, monkeypatch):
    import ray

    from ulcore.data.sharding import run_shard

    root = registry["tmp"] / "train"
    monkeypatch.chdir(registry["tmp"])
    cfg = _config(root, registry["tmp"], registry["prefix"], *WARM, *STILL, "stage1.total_samples=16")
    run_shard(cfg)
    try:
        result = run_stage1(cfg)
        exported = _exported(root)
        for net in ("encoder", "decoder", "prior"):
            assert _same(exported[net], registry["weights"][net]), net
        c = tracking.client(tracking.tracking_uri(cfg))
        lineage = registry["lineage"]
        tags = c.get_run(result["mlflow_run_id"]).data.tags
        assert tags["warm_start.encoder"] == f"{model_name(cfg, 'encoder')} v{lineage.versions['encoder']}"
        assert tags["warm_start.stage1_run_id"] == lineage.stage1_run_id
        done = json.loads((root / "models" / "stage1" / "done.json").read_text())
        assert done["warm_start"]["lineage"] == lineage.stage1_run_id
        registered = c.get_model_version(model_name(cfg, "prior"), done["registered"]["prior"])
        assert registered.tags["warm_start.prior"] == f"{model_name(cfg, 'prior')} v{lineage.versions['prior']}"

        # A checkpoint of the run (at 16 of 32 samples, other weights) is resumed; the champion is not loaded again.
        longer = _config(root, registry["tmp"], registry["prefix"], *WARM, *STILL, "stage1.total_samples=32")
        digest = run_digest(longer, STAGE1, inputs_digest(longer), warm_start.resolve(longer, "stage1"))
        torch.manual_seed(7)
        resumed = Stage1Objective(longer)
        optimizer = torch.optim.AdamW(resumed.parameters(), lr=longer.stage1.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        save_state(root / "checkpoints" / f"stage1-{digest}" / "earlier" / "checkpoint_000000", model=resumed,
                   ema=resumed, optimizer=optimizer, scheduler=scheduler, progress=Progress(16, 1),
                   grad_clip=GradClipper("absolute", 1.0).state_dict(), config_yaml=longer.to_yaml(), digest=digest)
        run_stage1(longer)
        exported = _exported(root)
        for net in ("encoder", "decoder", "prior"):
            assert _same(exported[net], getattr(resumed, net).state_dict()), net
            assert not _same(exported[net], registry["weights"][net]), net
    finally:
        ray.shutdown()
