"""Warm start: a training stage that starts from scratch takes the registry's champion weights instead of a random
initialisation (`stage1.init_from` / `stage2.init_from` = champion; default none).

- Stage 1 initialises its encoder, decoder and prior, stage 2 its base model, from the versions under
  `tracking.champion_alias`, which must be one lineage (ulcore.promotion.lineage_of: never nets of two stage-1
  runs). The EMA copies start equal to them: the EMA is made from the initialised nets. A checkpoint of the run
  always wins: a resumed run continues from it and the warm start is not applied again.
- The champion is resolved once, on the driver, before the done rule (`resolve`). Its versions are part of the
  stage's identity (ulcore.train.loop.run_digest): a warm-started run is never taken for a cold one, nor for one
  started from another champion. The run is tagged `warm_start.<net> = <model> v<version>`, and so are the
  versions it registers.
- No champion yet (the first run): a cold start, said in the log and tagged `warm_start = none: no champion yet`;
  its identity is a cold run's.
- A champion trained with other nets (model widths, depths, ...): ConfigError naming the knob and the `model` keys
  that differ, before the first step (`initialise`, in every Ray Train worker; the driver passes the versions, not
  the weights).
- Where it fits (UL §3.3): the base model is trained on the latents of a frozen stage-1 encoder, so its weights are
  fitted to that encoder's latent space. A stage-2 warm start matches when the latents come from the champion's own
  stage-1 run; after a warm-started stage 1 they start there and drift; after a cold one they are unrelated. The log
  says when the latents are not the champion's (`announce`).
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ulcore import tracking
from ulcore.config import Config, ConfigError, ModelConfig
from ulcore.errors import LineageError
from ulcore.models import load_registered
from ulcore.promotion import current_champion, lineage_of, model_name

STAGE_NETS = {"stage1": ("encoder", "decoder", "prior"), "stage2": ("base",)}  # attributes of each stage's objective
NO_CHAMPION_TAG = "none: no champion yet"


@dataclass(frozen=True)
class WarmStart:
    """What a stage's nets start from: registered versions of the champion lineage."""

    stage: str  # "stage1" | "stage2"
    stage1_run_id: str  # the champion's lineage
    versions: dict[str, tuple[str, str]]  # net -> (registered model name, version)

    @property
    def key(self) -> str:
        return f"{self.stage}.init_from"

    def identity(self) -> dict[str, Any]:
        """The part of the stage's digest (and done marker) that says what training started from."""
        return {"lineage": self.stage1_run_id, "versions": {net: f"{name} v{version}"
                                                            for net, (name, version) in self.versions.items()}}

    def tags(self) -> dict[str, str]:
        return {**{f"warm_start.{net}": f"{name} v{version}" for net, (name, version) in self.versions.items()},
                "warm_start.stage1_run_id": self.stage1_run_id}

    def describe(self) -> str:
        return (", ".join(f"{name} v{version}" for name, version in self.versions.values())
                + f" (the champion: lineage of stage-1 run {self.stage1_run_id})")


def resolve(cfg: Config, stage: str) -> WarmStart | None:
    """The champion versions `<stage>.init_from = champion` starts from; None for a cold start (the knob is none,
    or there is no champion yet). A champion that is not one lineage is a LineageError naming the knob."""
    if getattr(cfg, stage).init_from == "none":
        return None
    champion = current_champion(cfg)
    if champion is None:
        return None
    try:
        lineage = lineage_of(cfg, champion.versions)
    except LineageError as exc:
        raise LineageError(f"{stage}.init_from = champion: the champion's versions are not one lineage ({exc}); "
                           "promote one (`unified-latents promote --run ID`) or set "
                           f"{stage}.init_from = none") from None
    return WarmStart(stage, lineage.stage1_run_id,
                     {net: (model_name(cfg, net), lineage.versions[net]) for net in STAGE_NETS[stage]})


def announce(cfg: Config, stage: str, warm: WarmStart | None, run_id: str, latents_of: str | None = None) -> None:
    """Say on the log and on the MLflow run what training starts from (nothing when the knob is none).
    `latents_of`: stage 2's lineage, the stage-1 run whose encoder made the latents it trains on."""
    if getattr(cfg, stage).init_from == "none":
        return
    from mlflow.entities import RunTag

    if warm is None:
        print(f"[{stage}] {stage}.init_from = champion, but no {cfg.tracking.model_prefix}-* version carries the "
              f"alias {cfg.tracking.champion_alias!r} yet: cold start (the first run)", flush=True)
        tags = {"warm_start": NO_CHAMPION_TAG}
    else:
        print(f"[{stage}] warm start ({warm.key} = champion): {warm.describe()}", flush=True)
        tags = warm.tags()
        if latents_of is not None and latents_of != warm.stage1_run_id:
            print(f"[{stage}] note: the champion's base model was trained on the latents of stage-1 run "
                  f"{warm.stage1_run_id}, these come from stage-1 run {latents_of}: the warm start helps only as far "
                  "as that latent space is still the champion's (UL §3.3; README \"Scheduled retraining\")",
                  flush=True)
    tracking.client(tracking.tracking_uri(cfg)).log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def initialise(objective: nn.Module, warm: WarmStart, cfg: Config, tracking_uri: str) -> None:
    """Load the champion's weights into the objective's nets (`objective.<net>`), checked against this run's
    architecture first. Every Ray Train rank calls it, as every rank builds the same random init otherwise."""
    import mlflow

    registry = tracking.client(tracking_uri)  # not `models:/` URIs: MLflow resolves those in its default registry
    for net, (name, version) in warm.versions.items():
        with tempfile.TemporaryDirectory(prefix="ul-warm-start-") as tmp:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=registry.get_model_version_download_uri(name, version), dst_path=tmp,
                tracking_uri=tracking_uri)
            state, trained = load_registered(Path(local), f"models:/{name}/{version}")
        module = getattr(objective, net)
        _check_fits(module, state, trained, cfg, warm, f"{name} v{version}", net)
        module.load_state_dict(state)


def _shown(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _check_fits(module: nn.Module, state: dict[str, Any], trained: Config, cfg: Config, warm: WarmStart,
                version: str, net: str) -> None:
    """ConfigError naming the knob and what differs when the champion's tensors do not fit this run's net."""
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state.items()}
    if own == theirs:
        return
    differ = [f"model.{f.name} = {_shown(getattr(trained.model, f.name))} (this run: "
              f"{_shown(getattr(cfg.model, f.name))})" for f in dataclasses.fields(ModelConfig)
              if getattr(trained.model, f.name) != getattr(cfg.model, f.name)]
    if not differ:  # same params, other code: name the first tensor that does not fit
        first = next(k for k in sorted(own.keys() | theirs.keys()) if own.get(k) != theirs.get(k))
        differ = [f"tensor {first} of shape {theirs.get(first)} (this run: {own.get(first)})"]
    raise ConfigError(f"{warm.key} = champion: {version} does not fit this run's {net}: it was trained with "
                      f"{'; '.join(differ)}. Set the model section to the champion's, or {warm.key} = none")


__all__ = ["WarmStart", "resolve", "announce", "initialise", "STAGE_NETS", "NO_CHAMPION_TAG"]
