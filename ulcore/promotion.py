"""Evaluate, then promote: the candidate lineage becomes the champion only when it beats it on the same protocol.

- A *lineage* is the four registered nets that belong together: encoder, decoder and prior of one stage-1 run and
  a base model trained on that encoder's latents. Training tags every version with `stage1_run_id`
  (ulcore.train.loop) and registers it under `tracking.candidate_alias`; `tracking.champion_alias` moves only here,
  for all four nets at once, never to versions of two stage-1 runs (LineageError).
- The *candidate* is what metrics/eval.json evaluated (its `lineage`); its numbers are compared with the champion's,
  recorded on the champion's versions as tags (`eval.<metric>`, `eval.protocol_digest`) when it was judged.
- *Same protocol*: numbers compare only under equal `protocol_digest` (N, seeds, sampler, steps, guidance, the
  reference statistics' keys, the FID network: EvalProtocol.digest). When the champion's were measured under
  another one (new data changes the reference statistics), the champion's registered nets are evaluated again
  under the current protocol first, and its tags updated; when that cannot be done the candidate is refused, with
  the reason.
- The gate (params `promote`): the candidate's `metric` must be better than the champion's by at least
  `min_improvement` of the champion's value (config.GATE_METRICS says which way is better), and no metric in
  `guards` may be worse than the champion's by more than its allowance (in the metric's units). No champion yet:
  the candidate is promoted.
- Records: metrics/promotion.json (`promoted`, `reason`, `candidate` and `champion` metrics, the latter null
  without a champion), an MLflow run tagged `stage=promote` named `promotion: promoted|rejected (kind)` with both
  metric sets (`candidate.<m>`, `champion.<m>`), and tags on the candidate's versions (`promotion.decision`,
  `promotion.reason`, `promotion.run_id`). People promote a run's lineage by hand (`promote_run`, reason "manual")
  or roll back (`rollback`): each champion's versions carry `promotion.previous_champion`, the lineage it replaced,
  so rollbacks walk back one promotion at a time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ulcore import layout, storage, tracking
from ulcore.config import GATE_METRICS, Config, PromoteConfig
from ulcore.errors import LineageError
from ulcore.tracking import STAGE1_RUN_TAG

NETS = ("encoder", "decoder", "prior", "base")
STAGE1_NETS = NETS[:3]
PROTOCOL_TAG = "eval.protocol_digest"
EVAL_RUN_TAG = "eval.run_id"
DECISION_TAG = "promotion.decision"
REASON_TAG = "promotion.reason"
RUN_TAG = "promotion.run_id"
STATE_TAG = "promotion.state"  # what the decision was made on: a rerun with the same state does no work
PREVIOUS_TAG = "promotion.previous_champion"
MANUAL = "manual"


@dataclass(frozen=True)
class Lineage:
    stage1_run_id: str
    versions: dict[str, str]  # net -> registered version

    def describe(self) -> str:
        return f"stage-1 run {self.stage1_run_id} (" + ", ".join(f"{n} v{v}" for n, v in self.versions.items()) + ")"

    def to_json(self) -> str:
        return json.dumps({"stage1_run_id": self.stage1_run_id, "versions": self.versions}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Lineage:
        doc = json.loads(text)
        return cls(doc["stage1_run_id"], dict(doc["versions"]))


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str


# ---------------------------------------------------------------------------------------------- the gate


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _better_by(metric: str, candidate: float, champion: float) -> float:
    """How much better the candidate is, in the metric's units (negative: worse)."""
    return champion - candidate if GATE_METRICS[metric] == "lower" else candidate - champion


def gate(p: PromoteConfig, candidate: Mapping[str, Any], champion: Mapping[str, Any] | None) -> Decision:
    """The promotion rule on two metric sets measured under one protocol (the module docstring)."""
    if champion is None:
        return Decision(True, "first promotion: there is no champion yet")
    for name in (p.metric, *p.guards):
        for who, values in (("candidate", candidate), ("champion", champion)):
            if not _finite(values.get(name)):
                return Decision(False, f"the {who} has no {name} to compare (got {values.get(name)!r})")
    cand, champ = candidate[p.metric], champion[p.metric]
    gain = _better_by(p.metric, cand, champ)
    relative = gain / abs(champ) if champ else (math.inf if gain > 0 else 0.0)
    primary = (f"{p.metric} {cand:.6g} vs champion {champ:.6g}: {abs(relative):.2%} "
               f"{'better' if gain > 0 else 'worse' if gain < 0 else 'equal'}, promotion needs >= "
               f"{p.min_improvement:.2%} better ({GATE_METRICS[p.metric]})")
    if gain <= 0 or relative < p.min_improvement:
        return Decision(False, f"rejected: {primary}")
    checked = []
    for name, allowed in p.guards.items():
        worse = -_better_by(name, candidate[name], champion[name])
        text = (f"guard {name} {candidate[name]:.6g} vs champion {champion[name]:.6g}: "
                f"{max(worse, 0.0):.4g} worse, at most {allowed:g} allowed")
        if worse > allowed:
            return Decision(False, f"rejected: {text} ({primary})")
        checked.append(text)
    return Decision(True, "; ".join([f"promoted: {primary}", *checked]))


# ---------------------------------------------------------------------------------------------- the registry


def _client(cfg: Config) -> Any:
    return tracking.client(tracking.tracking_uri(cfg))


def model_name(cfg: Config, net: str) -> str:
    return f"{cfg.tracking.model_prefix}-{net}"


def _alias_version(c: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException as exc:  # no such model, or no such alias on it
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def current_champion(cfg: Config) -> Lineage | None:
    """The versions under tracking.champion_alias (None when no net has one): as they are, even when incomplete
    or mixed (set by hand, or by a version of this project before the gate); lineage_of says whether they fit."""
    c = _client(cfg)
    found = {net: _alias_version(c, model_name(cfg, net), cfg.tracking.champion_alias) for net in NETS}
    versions = {net: str(v.version) for net, v in found.items() if v is not None}
    if not versions:
        return None
    first = next(v for v in found.values() if v is not None)
    return Lineage(first.tags.get(STAGE1_RUN_TAG) or first.run_id or "unknown", versions)


def lineage_of(cfg: Config, versions: Mapping[str, str]) -> Lineage:
    """The lineage of these four versions, or LineageError naming the net that does not belong."""
    missing = [net for net in NETS if net not in versions]
    if missing:
        raise LineageError(f"incomplete lineage {dict(versions)}: no {', '.join(missing)} version")
    from mlflow.exceptions import MlflowException

    c = _client(cfg)
    mv = {}
    for net in NETS:
        try:
            mv[net] = c.get_model_version(model_name(cfg, net), str(versions[net]))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise LineageError(f"{model_name(cfg, net)} v{versions[net]} is not in the registry (deleted?)") from None
    runs = {net: mv[net].run_id for net in STAGE1_NETS}
    origin = runs["encoder"]
    for net in STAGE1_NETS:
        if runs[net] != origin or mv[net].tags.get(STAGE1_RUN_TAG, origin) != origin:
            raise LineageError(f"mixed lineage: encoder v{versions['encoder']} comes from stage-1 run {origin}, "
                               f"{net} v{versions[net]} from run {runs[net]}")
    base = mv["base"].tags.get(STAGE1_RUN_TAG)
    if base != origin:
        raise LineageError(f"mixed lineage: encoder, decoder and prior v{versions['encoder']}/"
                           f"v{versions['decoder']}/v{versions['prior']} come from stage-1 run {origin}, but base "
                           f"v{versions['base']} was trained on the latents of stage-1 run {base} "
                           f"(its {STAGE1_RUN_TAG} tag)")
    return Lineage(origin, {net: str(versions[net]) for net in NETS})


def lineage_of_run(cfg: Config, run_id: str) -> Lineage:
    """The lineage a stage-1 run (with the newest base model trained on its latents) or a stage-2 run belongs to."""
    c = _client(cfg)
    base = c.search_model_versions(f"name = '{model_name(cfg, 'base')}' and run_id = '{run_id}'")
    if base:
        origin = base[0].tags.get(STAGE1_RUN_TAG)
        if not origin:
            raise LineageError(f"base v{base[0].version} of run {run_id} has no {STAGE1_RUN_TAG} tag (registered "
                               "before lineages were recorded): its stage-1 nets are unknown")
        base_version = str(base[0].version)
    else:
        origin = run_id
        trained_on = c.search_model_versions(f"name = '{model_name(cfg, 'base')}' and "
                                             f"tags.{STAGE1_RUN_TAG} = '{run_id}'")
        if not trained_on:
            raise LineageError(f"run {run_id}: no {model_name(cfg, 'base')} version from it or trained on its "
                               "latents (give a stage-1 run with a finished stage 2, or a stage-2 run)")
        base_version = str(max(int(v.version) for v in trained_on))
    versions = {"base": base_version}
    for net in STAGE1_NETS:
        found = c.search_model_versions(f"name = '{model_name(cfg, net)}' and run_id = '{origin}'")
        if not found:
            raise LineageError(f"stage-1 run {origin} registered no {model_name(cfg, net)} version")
        versions[net] = str(max(int(v.version) for v in found))
    return lineage_of(cfg, versions)


def _tag_versions(cfg: Config, lineage: Lineage, tags: Mapping[str, str]) -> None:
    c = _client(cfg)
    for net, version in lineage.versions.items():
        for key, value in tags.items():
            c.set_model_version_tag(model_name(cfg, net), version, key, str(value)[:tracking.MAX_TAG_VALUE])


def _version_tags(cfg: Config, lineage: Lineage) -> dict[str, str]:
    """One version's tags (the encoder's when it has one): promotion tags are set on all four together."""
    net = "encoder" if "encoder" in lineage.versions else next(iter(lineage.versions))
    return dict(_client(cfg).get_model_version(model_name(cfg, net), lineage.versions[net]).tags)


def recorded_metrics(cfg: Config, lineage: Lineage) -> tuple[dict[str, float], str | None]:
    """The lineage's evaluation as tagged on its versions, and the protocol it was measured under."""
    tags = _version_tags(cfg, lineage)
    metrics = {m: float(tags[f"eval.{m}"]) for m in GATE_METRICS if f"eval.{m}" in tags}
    return metrics, tags.get(PROTOCOL_TAG)


def record_metrics(cfg: Config, lineage: Lineage, metrics: Mapping[str, float], protocol: str, eval_run: str) -> None:
    _tag_versions(cfg, lineage, {**{f"eval.{m}": repr(float(v)) for m, v in metrics.items()},
                                 PROTOCOL_TAG: protocol, EVAL_RUN_TAG: eval_run})


def move_champion(cfg: Config, target: Lineage, replaced: Lineage | None) -> None:
    """Point the champion alias of all four nets at `target`. `replaced` (the champion before) is remembered on
    the target's versions for `rollback`; a rollback passes None and keeps what they remember."""
    c = _client(cfg)
    if replaced is not None:
        _tag_versions(cfg, target, {PREVIOUS_TAG: replaced.to_json()})
    for net in NETS:
        c.set_registered_model_alias(model_name(cfg, net), cfg.tracking.champion_alias, target.versions[net])
    now = current_champion(cfg)
    if now is None or now.versions != target.versions:
        raise LineageError(f"the champion alias did not move to {target.describe()} on every net: now "
                           f"{now.versions if now else None}")


# ---------------------------------------------------------------------------------------------- records


def _record(cfg: Config, run_id: str, kind: str, decision: Decision, doc: dict[str, Any],
            candidate: Lineage | None, champion: Lineage | None) -> None:
    """The promotion run: decision, reason, both lineages and both metric sets; promotion.json as an artefact."""
    from mlflow.entities import RunTag

    tags = {"mlflow.runName": f"promotion: {'promoted' if decision.promoted else 'rejected'} ({kind})",
            "promotion.kind": kind, "promotion.promoted": str(decision.promoted).lower(),
            REASON_TAG: decision.reason[:tracking.MAX_TAG_VALUE],
            "promotion.candidate": candidate.to_json() if candidate else "unknown",
            "promotion.champion": champion.to_json() if champion else "none"}
    tracking.client(tracking.tracking_uri(cfg)).log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    tracking.log_metrics(run_id, {**{f"candidate.{m}": v for m, v in doc["candidate"].items()},
                                  **{f"champion.{m}": v for m, v in (doc["champion"] or {}).items()}})
    with tempfile.TemporaryDirectory(prefix="ul-promotion-") as tmp:
        path = Path(tmp) / "promotion.json"
        path.write_text(json.dumps(doc, indent=2, sort_keys=True))
        tracking.log_artifact(run_id, path, "metrics")
    if candidate is not None:
        _tag_versions(cfg, candidate, {DECISION_TAG: "promoted" if decision.promoted else "rejected",
                                       REASON_TAG: decision.reason, RUN_TAG: run_id})


def _document(decision: Decision, candidate: Mapping[str, float], champion: Mapping[str, float] | None) -> dict:
    """metrics/promotion.json: exactly these four keys."""
    return {"promoted": decision.promoted, "reason": decision.reason, "candidate": dict(candidate),
            "champion": None if champion is None else dict(champion)}


# ---------------------------------------------------------------------------------------------- the stage


def reevaluate(cfg: Config, lineage: Lineage) -> dict[str, Any]:
    """eval.json's numbers for a registered lineage under the current protocol (its nets downloaded from MLflow)."""
    import mlflow
    from safetensors.torch import save_file

    from ulcore.eval.evaluate import Locations, measure

    with tempfile.TemporaryDirectory(prefix="ul-reevaluate-") as tmp:
        for stage, nets in (("stage1", STAGE1_NETS), ("stage2", ("base",))):
            folder = Path(tmp) / stage
            folder.mkdir()
            for net in nets:
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=f"models:/{model_name(cfg, net)}/{lineage.versions[net]}",
                    dst_path=str(Path(tmp) / "download" / net), tracking_uri=tracking.tracking_uri(cfg))
                bundle = mlflow.pyfunc.load_model(local).unwrap_python_model()
                save_file(bundle.state_dicts["weights"], str(folder / f"{net}.safetensors"))
                (folder / "config.yaml").write_text(bundle.config_yaml)
        where = Locations(stage1=str(Path(tmp) / "stage1"), stage2=str(Path(tmp) / "stage2"),
                          eval_json=str(Path(tmp) / "eval.json"), outputs=str(Path(tmp) / "outputs"),
                          plots=str(Path(tmp) / "plots"))
        return measure(cfg, where).result


def _gate_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    return {m: float(result[m]) for m in GATE_METRICS if _finite(result.get(m))}


def _champion_metrics(cfg: Config, champion: Lineage, protocol: str,
                      run_id: str) -> tuple[dict[str, float] | None, str]:
    """The champion's numbers under `protocol` (re-evaluated when recorded under another), or None and why not."""
    metrics, recorded = recorded_metrics(cfg, champion)
    if recorded == protocol:
        return metrics, ""
    try:
        lineage_of(cfg, champion.versions)
    except LineageError as exc:
        return None, (f"refused: the champion's metrics were recorded under protocol {recorded or 'none'}, this "
                      f"evaluation's is {protocol}, and the champion cannot be re-evaluated ({exc}); promote by "
                      "hand (`unified-latents promote --run ID`) after checking the numbers")
    result = reevaluate(cfg, champion)
    if result["protocol_digest"] != protocol:
        return None, (f"refused: re-evaluating the champion gave protocol {result['protocol_digest']}, not this "
                      f"evaluation's {protocol}")
    fresh = _gate_metrics(result)
    record_metrics(cfg, champion, fresh, protocol, run_id)
    return fresh, f"champion re-evaluated under protocol {protocol} (its numbers were for {recorded or 'none'})"


def run_promote(cfg: Config) -> dict[str, Any]:
    """The `promote` stage: judge metrics/eval.json's lineage against the champion; write metrics/promotion.json."""
    storage.use_endpoint(cfg.storage.s3_endpoint)
    eval_uri, out_uri = layout.metrics(cfg.storage.root, "eval"), layout.metrics(cfg.storage.root, "promotion")
    if not storage.exists(eval_uri):
        raise FileNotFoundError(f"{eval_uri} not found: run the evaluate stage first (python -m flows.evaluate)")
    evaluation = storage.read_json(eval_uri)
    if "protocol_digest" not in evaluation or "lineage" not in evaluation:
        raise LineageError(f"{eval_uri} names no protocol_digest or lineage (written by an earlier version): rerun "
                           "the evaluate stage")
    protocol, candidate_metrics = evaluation["protocol_digest"], _gate_metrics(evaluation)
    champion = current_champion(cfg)
    try:
        candidate: Lineage | None = lineage_of(cfg, evaluation["lineage"]["versions"])
    except LineageError as exc:
        candidate, mixed = None, exc
    state = {"promote": dataclasses.asdict(cfg.promote), "eval": evaluation.get("inputs_digest"),
             "protocol": protocol, "champion": champion.versions if champion else None}
    if candidate is not None and storage.exists(out_uri) and \
            _version_tags(cfg, candidate).get(STATE_TAG) == layout.digest(state):
        previous = storage.read_json(out_uri)
        return {**previous, "skipped": True, "markdown": f"## promote\n\nUp to date: {previous['reason']}"}

    champion_metrics: dict[str, float] | None = None
    with tracking.stage_run(cfg, "promote") as run_id:
        if candidate is None:
            decision = Decision(False, f"refused: {mixed}")
        elif champion is not None and champion.versions == candidate.versions:
            champion_metrics = candidate_metrics
            decision = Decision(True, f"already the champion: {candidate.describe()}; nothing moved")
        else:
            record_metrics(cfg, candidate, candidate_metrics, protocol, str(evaluation.get("mlflow_run_id")))
            note = ""
            if champion is not None:
                champion_metrics, note = _champion_metrics(cfg, champion, protocol, run_id)
            if champion is not None and champion_metrics is None:
                decision, champion_metrics = Decision(False, note), recorded_metrics(cfg, champion)[0]
            else:
                decision = gate(cfg.promote, candidate_metrics, champion_metrics)
                if note:
                    decision = Decision(decision.promoted, f"{decision.reason}; {note}")
            if decision.promoted:
                move_champion(cfg, candidate, champion)
        doc = _document(decision, candidate_metrics, champion_metrics if champion is not None else None)
        _record(cfg, run_id, "gate", decision, doc, candidate, champion)
        if candidate is not None:
            after = candidate if decision.promoted else champion
            _tag_versions(cfg, candidate, {STATE_TAG: layout.digest({**state, "champion": after.versions
                                                                     if after else None})})
        storage.write_json(out_uri, doc)
    mark = "promoted" if decision.promoted else "not promoted"
    return {**doc, "mlflow_run_id": run_id, "markdown": f"## promote\n\n**{mark}**: {decision.reason}"}


# ---------------------------------------------------------------------------------------------- by hand


def promote_run(cfg: Config, run_id: str) -> dict[str, Any]:
    """Make the lineage of a stage-1 or stage-2 run the champion, whatever the gate would say (reason "manual").
    Numbers recorded on its versions (or metrics/eval.json's, when it evaluated this lineage) go with it."""
    target = lineage_of_run(cfg, run_id)
    champion = current_champion(cfg)
    if champion is not None and champion.versions == target.versions:
        raise LineageError(f"{target.describe()} is already the champion: nothing to promote")
    eval_uri = layout.metrics(cfg.storage.root, "eval")
    evaluation = storage.read_json(eval_uri) if storage.exists(eval_uri) else {}
    if evaluation.get("lineage", {}).get("versions") == target.versions and "protocol_digest" in evaluation:
        record_metrics(cfg, target, _gate_metrics(evaluation), evaluation["protocol_digest"],
                       str(evaluation.get("mlflow_run_id")))
    decision = Decision(True, MANUAL)
    doc = _document(decision, recorded_metrics(cfg, target)[0],
                    recorded_metrics(cfg, champion)[0] if champion else None)
    with tracking.stage_run(cfg, "promote") as promotion_run:
        move_champion(cfg, target, champion)
        _record(cfg, promotion_run, MANUAL, decision, doc, target, champion)
    return {**doc, "lineage": target.describe(), "mlflow_run_id": promotion_run}


def rollback(cfg: Config) -> dict[str, Any]:
    """Move the champion back to the lineage the current one replaced (each rollback goes one promotion back)."""
    champion = current_champion(cfg)
    if champion is None:
        raise LineageError(f"nothing to roll back: no {cfg.tracking.model_prefix}-* version carries the alias "
                           f"{cfg.tracking.champion_alias!r}")
    c = _client(cfg)
    remembered = {c.get_model_version(model_name(cfg, net), v).tags.get(PREVIOUS_TAG)
                  for net, v in champion.versions.items()}
    if len(remembered) != 1 or None in remembered:
        raise LineageError(f"nothing to roll back to: the champion {champion.describe()} records no previous "
                           f"champion on all four nets ({PREVIOUS_TAG} tags: {sorted(map(str, remembered))}); it was "
                           "the first one promoted, or set outside the promote stage")
    target = lineage_of(cfg, Lineage.from_json(remembered.pop()).versions)
    decision = Decision(True, f"rollback: {champion.describe()} -> {target.describe()}")
    doc = _document(decision, recorded_metrics(cfg, target)[0], recorded_metrics(cfg, champion)[0])
    with tracking.stage_run(cfg, "promote") as promotion_run:
        move_champion(cfg, target, None)
        _record(cfg, promotion_run, "rollback", decision, doc, target, champion)
    return {**doc, "lineage": target.describe(), "mlflow_run_id": promotion_run}


__all__ = ["Lineage", "Decision", "gate", "current_champion", "lineage_of", "lineage_of_run", "recorded_metrics",
           "record_metrics", "move_champion", "reevaluate", "run_promote", "promote_run", "rollback", "NETS",
           "model_name"]
