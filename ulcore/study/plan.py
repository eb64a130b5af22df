"""The paper's trends at tiny scale (`python -m flows.study`): which settings run, where each one lives, and when a
finished one is reused. The flow runs the stages; the verdicts and the report are in verdicts.py and report.py.

Settings, each a stage-1 run with `--set` overrides (docs/method.md §3, §6, §8):
- the loss factor c_lf ∈ {1.3, 1.7, 2.1, 3.0} at λ(0) = 5 (UL Table 2: bits/pixel and PSNR rise with c_lf);
- λ(0) ∈ {5, 10} at the preset's c_lf (UL Table 6, ablation B: λ(0) = 10 collapses the rate);
- the base model's samples against the stage-1 prior's (UL §3.3) at the preset's c_lf and λ(0) = 5: the one setting
  that also trains stage 2.
Two settings with the same (c_lf, λ(0)) are one run. Every setting is evaluated with `eval.prior_gfid` on, so each
has a rate, a distortion, an rFID and the prior samples' gFID.

Where (`<storage.root>/runs/study/`, a local folder):

    shared/                       raw data, shards and FID reference statistics, built once by the raw_manifest,
                                  shard and reference stages (idempotent: a rerun finds them up to date)
    <mode>/<slug>/                one storage root per setting (mode `full` or `quick`), e.g. quick/clf1.3_lambda5
    <mode>/<slug>/data/shards     a link to shared/data/shards, and data/fid_refs to shared/data/fid_refs: every
                                  setting trains on the same shards and reuses the same reference statistics. Their
                                  identities are the shared files' own (shard stats, reference keys), so each
                                  setting's stage digests name the data version it used
    <mode>/<slug>/study.json      the setting's done marker: written after its evaluation, it records the digest of
                                  the setting's resolved config (execution-only sections left out) and of the shards'
                                  summary, the numbers, and the MLflow run that measured them; a rerun whose digest
                                  matches reuses them (layout.is_done)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ulcore import layout, storage
from ulcore.config import Config, ConfigError
from ulcore.data.shards import content_digest

LOSS_FACTORS = (1.3, 1.7, 2.1, 3.0)  # UL Table 2 sweeps 1.3-2.1; 3.0 and the preset's c_lf (tiny: 8.0, run by the
# λ(0) settings) extend it
LOGSNR_0S = (5.0, 10.0)  # UL Table 6: the baseline's λ(0) = 5 and ablation B's λ(0) = 10
SHARED_STAGES = ("raw_manifest", "shard", "reference")
MARKER = "study.json"
LINKED = (layout.SHARDS, layout.FID_REFS)  # what every setting reads from shared/
EXECUTION_ONLY = ("tracking", "ray")  # sections that never change a number
# --quick: stage 1 and stage 2 at a quarter of the demo's length, evaluation on 100 samples with 16 sampling steps
# (five settings took 48 min on a 2-core machine busy with other work; README)
QUICK = (
    "stage1.total_samples=4096", "stage1.warmup_samples=512", "stage1.log_every_samples=1024",
    "stage1.ckpt_every_samples=2048", "stage1.ema_halflife_samples=512",
    "stage2.total_samples=4096", "stage2.warmup_samples=512", "stage2.log_every_samples=1024",
    "stage2.ckpt_every_samples=1024", "stage2.ema_halflife_samples=512",
    "eval.num_samples=100", "eval.reference_samples=100", "eval.base_steps=16", "eval.decoder_steps=16",
)


@dataclass(frozen=True)
class Setting:
    """One run of the study: stage 1 (and stage 2 when `stage2`) at this loss factor and λ(0), then evaluate."""
    loss_factor: float
    logsnr_0: float
    stage2: bool = False

    @property
    def slug(self) -> str:
        return f"clf{self.loss_factor:g}_lambda{self.logsnr_0:g}"

    @property
    def overrides(self) -> list[str]:
        return [f"stage1.loss_factor={self.loss_factor:g}", f"model.logsnr_0={self.logsnr_0:g}",
                "eval.prior_gfid=true"]

    @property
    def stages(self) -> tuple[str, ...]:
        return ("stage1", "encode", "stage2", "evaluate") if self.stage2 else ("stage1", "evaluate")


def settings(cfg: Config, loss_factors: tuple[float, ...] = LOSS_FACTORS,
             logsnr_0s: tuple[float, ...] = LOGSNR_0S) -> list[Setting]:
    """The c_lf sweep at the first λ(0), then the λ(0) sweep at the config's c_lf; duplicates run once. Stage 2 is
    trained for (config's c_lf, first λ(0)) only: the base-versus-prior comparison."""
    if not loss_factors or not logsnr_0s:
        raise ConfigError(f"study: loss factors {list(loss_factors)} and λ(0)s {list(logsnr_0s)}: "
                          "each needs at least one value")
    reference = (float(cfg.stage1.loss_factor), float(logsnr_0s[0]))
    pairs = [(float(lf), float(logsnr_0s[0])) for lf in loss_factors]
    pairs += [(reference[0], float(l0)) for l0 in logsnr_0s]
    unique = list(dict.fromkeys(pairs))
    return [Setting(lf, l0, stage2=(lf, l0) == reference) for lf, l0 in unique]


def study_root(cfg: Config) -> str:
    """<storage.root>/runs/study; a local folder (settings link to the shared shards)."""
    if storage.is_s3(cfg.storage.root):
        raise ConfigError(f"storage.root = {cfg.storage.root}: the study links every setting to one copy of the "
                          "shards and FID references, which needs a local folder; run it with a local storage.root")
    return os.path.join(cfg.storage.root, "runs", "study")


def shared_root(cfg: Config) -> str:
    return os.path.join(study_root(cfg), "shared")


def setting_root(cfg: Config, setting: Setting, quick: bool) -> str:
    return os.path.join(study_root(cfg), "quick" if quick else "full", setting.slug)


def link_shared(root: str, shared: str) -> None:
    """Point `root`'s data/shards and data/fid_refs at `shared`'s (relative links, so the tree can move)."""
    for rel in LINKED:
        target, link = os.path.join(shared, rel), os.path.join(root, rel)
        os.makedirs(target, exist_ok=True)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        relative = os.path.relpath(target, os.path.dirname(link))
        if os.path.islink(link):
            if os.readlink(link) == relative:
                continue
            os.unlink(link)
        elif os.path.exists(link):
            raise FileExistsError(f"{link}: a folder of its own; the study links it to {target} (remove it)")
        os.symlink(relative, link)


def marker_digest(cfg: Config) -> str:
    """What a setting's numbers are computed from: its resolved config but the execution-only sections, and the
    content of the shards' summary (a new data version is a new digest)."""
    params = {k: v for k, v in cfg.to_dict().items() if k not in EXECUTION_ONLY}
    summary = layout.shards_summary(cfg.storage.root)
    data = content_digest(storage.read_json(summary)) if storage.exists(summary) else "no shards"
    return layout.digest({"params": params, "data": data})


def finished(cfg: Config) -> dict[str, Any] | None:
    """The setting's marker when its numbers are up to date (layout.is_done), else None."""
    marker = os.path.join(cfg.storage.root, MARKER)
    return storage.read_json(marker) if layout.is_done(marker, marker_digest(cfg)) else None


def measured(cfg: Config) -> dict[str, Any]:
    """The numbers of a finished setting: metrics/eval.json's, and the stage-1 latent's spread (collapse shows as a
    std near σ₀)."""
    from ulcore.eval.evaluate import METRIC_KEYS

    evaluation = storage.read_json(layout.metrics(cfg.storage.root, "eval"))
    numbers = {k: evaluation.get(k) for k in METRIC_KEYS if evaluation.get(k) is not None}
    numbers["num_samples"] = evaluation["protocol"]["num_samples"]
    stage1 = layout.metrics(cfg.storage.root, "stage1")
    if storage.exists(stage1) and "latent_std" in storage.read_json(stage1):
        numbers["latent_std"] = storage.read_json(stage1)["latent_std"]
    return numbers


def record(cfg: Config, setting: Setting, numbers: dict[str, Any], run_id: str, seconds: float) -> None:
    """Write the done marker (atomically, after everything it describes)."""
    storage.write_json(os.path.join(cfg.storage.root, MARKER), {
        "digest": marker_digest(cfg), "setting": setting.slug, "overrides": setting.overrides,
        "metrics": numbers, "mlflow_run_id": run_id, "seconds": round(seconds, 1)})


__all__ = ["LOSS_FACTORS", "LOGSNR_0S", "SHARED_STAGES", "QUICK", "MARKER", "Setting", "settings", "study_root",
           "shared_root", "setting_root", "link_shared", "marker_digest", "finished", "measured", "record"]
