"""Registry lineages as training leaves them, and metrics/eval.json as evaluation writes it, for the promotion tests:
real MLflow runs and model versions (no weights: the gate reads aliases and tags only)."""

from __future__ import annotations

import uuid

from ulcore import layout, storage, tracking
from ulcore.config import Config, load_config
from ulcore.promotion import NETS, STAGE1_NETS, Lineage, model_name


def promotion_config(root, store, *extra: str) -> Config:
    """Its own model names and experiment in a shared SQLite store (creating a store's tables takes seconds)."""
    tag = uuid.uuid4().hex[:8]
    return load_config(None, [f"storage.root={root}", f"tracking.uri=sqlite:///{store}/mlflow.db",
                              f"tracking.model_prefix=t{tag}", f"tracking.experiment=promotion-{tag}", *extra])


def _version(cfg: Config, net: str, run_id: str, stage1_run: str | None) -> str:
    from mlflow.exceptions import MlflowException

    c = tracking.client(tracking.tracking_uri(cfg))
    name = model_name(cfg, net)
    try:
        c.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {tracking.STAGE1_RUN_TAG: stage1_run} if stage1_run else {}
    version = str(c.create_model_version(name, "file:///no-weights", run_id=run_id, tags=tags).version)
    c.set_registered_model_alias(name, cfg.tracking.candidate_alias, version)
    return version


def register_lineage(cfg: Config, *, stage1_run: str | None = None, tagged: bool = True) -> Lineage:
    """What stage 1 (unless `stage1_run` names an earlier one) and stage 2 register; `tagged=False`: as versions of
    this project registered before lineages were recorded."""
    versions = {}
    if stage1_run is None:
        with tracking.stage_run(cfg, "stage1") as stage1_run:
            for net in STAGE1_NETS:
                versions[net] = _version(cfg, net, stage1_run, stage1_run if tagged else None)
    else:
        c = tracking.client(tracking.tracking_uri(cfg))
        for net in STAGE1_NETS:
            found = c.search_model_versions(f"name = '{model_name(cfg, net)}' and run_id = '{stage1_run}'")
            versions[net] = str(max(int(v.version) for v in found))
    with tracking.stage_run(cfg, "stage2") as stage2_run:
        versions["base"] = _version(cfg, "base", stage2_run, stage1_run if tagged else None)
    return Lineage(stage1_run, {net: versions[net] for net in NETS})


def stage2_run(cfg: Config, lineage: Lineage) -> str:
    c = tracking.client(tracking.tracking_uri(cfg))
    return c.get_model_version(model_name(cfg, "base"), lineage.versions["base"]).run_id


def write_eval(cfg: Config, versions: dict[str, str], *, gfid: float, psnr: float, protocol: str = "p1") -> dict:
    """metrics/eval.json of an evaluation of these versions (only what the promote stage reads)."""
    doc = {"gfid": gfid, "psnr": psnr, "rfid": 5.0, "fvd": None, "protocol_digest": protocol,
           "lineage": {"versions": dict(versions)}, "mlflow_run_id": "evaluate-run",
           "inputs_digest": layout.digest([versions, gfid, psnr, protocol])}
    storage.write_json(layout.metrics(cfg.storage.root, "eval"), doc)
    return doc


def champion_versions(cfg: Config) -> dict[str, str]:
    """net -> version under the champion alias, read from each registered model's alias table."""
    c = tracking.client(tracking.tracking_uri(cfg))
    out = {}
    for net in NETS:
        name = model_name(cfg, net)
        if c.search_registered_models(f"name = '{name}'"):
            aliases = c.get_registered_model(name).aliases
            if cfg.tracking.champion_alias in aliases:
                out[net] = str(aliases[cfg.tracking.champion_alias])
    return out


def promotion_runs(cfg: Config) -> list:
    c = tracking.client(tracking.tracking_uri(cfg))
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    return c.search_runs([exp.experiment_id], "tags.stage = 'promote'", order_by=["attributes.start_time ASC"])
