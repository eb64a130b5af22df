"""The evaluate stage: gFID, rFID, PSNR, SSIM, both bitrates (and FVD for video) under a pinned protocol.

Protocol (all from `eval.*`, every seed and count in one protocol.EvalProtocol, logged with every number; the
phases that compute the statistics are in phases.py):
- gFID: `num_samples` base-model samples, class-balanced labels (i mod num_classes), sample i seeded by
  sample_seeds(eval.seed, i), `sampler`, `base_steps` / `decoder_steps`, `guidance` on `guidance_interval`, EMA
  weights (the exported ones) - against the reference statistics of the first `reference_samples` training
  images (0 = the whole split, the standard protocol; split data.splits[0], shard order), cached under
  data/fid_refs/<hash>.npz by the `reference` stage (reference.py; computed here when missing). The FID network
  file, its source and sha256 are pinned (inception.resolve_fid_weights).
- rFID / PSNR / SSIM / bits per pixel (÷ H·W) and per sub-pixel (÷ H·W·C): the first `num_samples` held-out
  images (data.splits[1], or the training split when there is only one), reconstructed with seed eval.seed + 2
  (decoder_steps, sampler); rFID compares the reconstructions with those same images (their statistics cached too).
- Video: FID on all frames; FVD on I3D features of whole clips (see fvd.py) when eval.i3d_weights is given:
  unconditional clips vs training clips, or with eval.fvd_context_frames = c > 0 the Kinetics-600 frame-prediction
  protocol (UL §5.7): held-out clip i mod N_val's first c real frames + generated rest (replacement conditioning,
  fvd.predicted_clips), FVD on the full clips, context included, vs those held-out clips.
- gfid_prior (eval.prior_gfid): the gFID protocol with the stage-1 prior in place of the base model (no labels),
  sample i seeded by sample_seeds(eval.seed + 9, i): UL §3.3 says the base model samples better than the prior.
- chroma_real / chroma_reconstructed / chroma_samples: image_metrics.chroma (mean std across the colour channels,
  0-255) of the held-out images, their reconstructions and the gFID samples: colour a greyscale dataset never has.
- psnr_unrelated: PSNR of each held-out image (clip) against the next one in its batch - what a reconstruction that
  kept nothing of its input scores, PSNR's counterpart of the FID floor: a `psnr` near it means the latent carries
  little of the image.
- FID floor: FID between the first `num_samples` training images and the rFID reference images - real vs real at
  the N of gFID, the best a generator can score there (reference.fid_floor; cached with the references).
- num_samples < 10000 is a *monitoring* evaluation: FID is biased upwards at small N and is not comparable to
  published 50k-sample numbers; eval.json says so.
Rerun with nothing changed does no work: eval.json stores a digest of every input (models, shards, params,
metric weights) and is returned as is when it matches.
For the promote stage eval.json also names the registered versions it evaluated (`lineage`, from the models' done
markers) and `protocol_digest` (EvalProtocol.digest): numbers of two evaluations compare only when these agree.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ulcore import images, layout, storage, tracking
from ulcore.config import Config
from ulcore.data.loaders import shard_uris
from ulcore.eval import reports
from ulcore.eval.fid import data_fingerprint, fid_from_stats
from ulcore.eval.fvd import fvd_protocol
from ulcore.eval.inception import resolve_fid_weights
from ulcore.eval.phases import (FeatureNets, Generation, Models, Prediction, Reconstruction, ReferencePass,
                                feature_nets, generation_phase, prediction_phase, prior_generation_phase,
                                reconstruction_phase, reference_phase)
from ulcore.eval.protocol import EvalProtocol
from ulcore.eval.reference import Reference, fid_floor, floor_reference, splits
from ulcore.models import load_stage1, load_stage2, stage1_root, stage2_root
from ulcore.runtime import compute_device

METRIC_KEYS = ("gfid", "gfid_prior", "fid_floor", "rfid", "psnr", "psnr_unrelated", "ssim", "bits_per_pixel_prior",
               "bits_per_pixel_base", "bits_per_subpixel_prior", "bits_per_subpixel_base", "fvd", "chroma_real",
               "chroma_reconstructed", "chroma_samples")


@dataclass(frozen=True)
class Locations:
    """Where the evaluate stage reads models and writes results; built in `locations` only."""
    stage1: str  # exported models
    stage2: str
    eval_json: str  # metrics/eval.json
    outputs: str  # grids and samples
    plots: str


def locations(cfg: Config) -> Locations:
    root = cfg.storage.root
    return Locations(stage1=stage1_root(cfg), stage2=stage2_root(cfg), eval_json=layout.metrics(root, "eval"),
                     outputs=layout.outputs(root), plots=layout.plots(root))


def _file_digest(uri: str) -> str:
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()[:16] if storage.exists(uri) else "missing"


def inputs_digest(cfg: Config, model_roots: dict[str, str], shards: dict[str, list[str]], weights_sha: str) -> str:
    """Everything the numbers depend on: params, exported model files, shard identities, metric weights."""
    parts: dict[str, Any] = {"eval": cfg.to_dict()["eval"], "data": cfg.to_dict()["data"], "weights": weights_sha}
    for name, root in model_roots.items():
        parts[name] = {uri.rsplit("/", 1)[-1]: _file_digest(uri) for uri in storage.list_uris(root)}
    parts["shards"] = {split: data_fingerprint(uris) for split, uris in shards.items()}
    if cfg.eval.i3d_weights and Path(cfg.eval.i3d_weights).is_file():
        from ulcore.eval.inception import file_sha256

        parts["i3d"] = file_sha256(cfg.eval.i3d_weights)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def metrics_markdown(result: dict[str, Any]) -> str:
    """The metric table and protocol line for the Prefect artefact."""
    p = result["protocol"]
    lines = ["| metric | value |", "| --- | --- |"]
    for key in METRIC_KEYS:
        value = result.get(key)
        lines.append(f"| {key} | {'n/a' if value is None else f'{value:.4f}'} |")
    lines += ["", f"Protocol: N = {p['num_samples']} ({'monitoring' if p['monitoring'] else 'reported'}), "
              f"sampler {p['sampler']}, steps {p['base_steps']}/{p['decoder_steps']}, guidance {p['guidance']} on "
              f"λ ∈ {p['guidance_interval']}, seed {p['seed']}, EMA weights; FID network "
              f"{p['fid_weights_source']} (sha256 {p['fid_weights_sha256'][:12]}), reference stats "
              f"{p['gfid_reference']['key_hash'] if p.get('gfid_reference') else 'n/a'} "
              f"({p['gfid_reference']['n'] if p.get('gfid_reference') else 0} training images)."]
    if result.get("fvd_unavailable_reason"):
        lines.append(f"FVD unavailable: {result['fvd_unavailable_reason']}")
    elif p.get("fvd"):
        lines.append(f"FVD protocol: {p['fvd']['summary']}.")
    if p["monitoring"]:
        lines.append(f"_{p['monitoring_note']}_")
    if result.get("mlflow_run_id"):
        lines.append(f"MLflow run `{result['mlflow_run_id']}`.")
    return "\n".join(lines)


def load_models(cfg: Config, where: Locations, device: torch.device) -> Models:
    """The exported EMA models on `device`; stage 2 only once it has been exported."""
    has_stage2 = storage.exists(storage.join(where.stage2, "config.yaml"))
    return Models(stage1=load_stage1(where.stage1).to(device),
                  stage2=load_stage2(where.stage2).to(device) if has_stage2 else None, device=device)


def evaluated_lineage(where: Locations) -> dict[str, Any]:
    """Which registered versions the exported models are (their done markers): the candidate the promote stage
    judges by these numbers. `stage1_run_id` is each training stage's lineage tag (ulcore.train.loop)."""
    lineage: dict[str, Any] = {"versions": {}}
    for stage, root in (("stage1", where.stage1), ("stage2", where.stage2)):
        marker = storage.join(root, layout.DONE_FILE)
        done = storage.read_json(marker) if storage.exists(marker) else {}
        lineage[stage] = {"run_id": done.get("mlflow_run_id"), "stage1_run_id": done.get("stage1_run_id")}
        lineage["versions"].update(done.get("registered", {}))
    return lineage


def run_evaluate(cfg: Config) -> dict[str, Any]:
    """Evaluate the exported models; writes metrics/eval.json, plots/, outputs/ and an MLflow run."""
    storage.use_endpoint(cfg.storage.s3_endpoint)
    t_start = time.perf_counter()
    where = locations(cfg)
    train_split, eval_split = splits(cfg)
    shards = {train_split: shard_uris(cfg, "images", train_split), eval_split: shard_uris(cfg, "images", eval_split)}
    weights = resolve_fid_weights(cfg.eval.fid_weights)
    roots = {"stage1": where.stage1}
    if storage.exists(storage.join(where.stage2, "config.yaml")):
        roots["stage2"] = where.stage2
    digest = inputs_digest(cfg, roots, shards, weights.sha256)
    if storage.exists(where.eval_json):
        previous = storage.read_json(where.eval_json)
        # an eval.json of an earlier version lacks the protocol digest the promote stage compares: measure again
        if previous.get("inputs_digest") == digest and "protocol_digest" in previous:
            return {**previous, "skipped": True, "markdown": metrics_markdown(previous)}
    measured = measure(cfg, where)
    result = measured.result
    result["lineage"] = evaluated_lineage(where)
    result["inputs_digest"] = digest
    measured.timings["total_s"] = time.perf_counter() - t_start
    result["timings"] = {k: round(v, 2) for k, v in measured.timings.items()}
    _publish(cfg, where, result, measured, tracking)
    result["markdown"] = metrics_markdown(result)
    return result


@dataclass
class Measured:
    """The numbers of eval.json (`result`) and what the phases produced for the grids."""
    result: dict[str, Any]
    rec: Reconstruction
    gen: Generation | None
    pred: Prediction | None
    timings: dict[str, float]
    prior_gen: Generation | None = None  # samples of the stage-1 prior (eval.prior_gfid)


def measure(cfg: Config, where: Locations) -> Measured:
    """Every number of the protocol for the models under `where.stage1` / `where.stage2`, writing nothing but
    missing reference statistics (the promote stage re-evaluates a champion's registered nets through here)."""
    train_split, eval_split = splits(cfg)
    shards = {train_split: shard_uris(cfg, "images", train_split), eval_split: shard_uris(cfg, "images", eval_split)}
    weights = resolve_fid_weights(cfg.eval.fid_weights)
    device = compute_device(cfg)
    models = load_models(cfg, where, device)
    nets = feature_nets(cfg, device, weights)
    train_ref = Reference(cfg, train_split, shards[train_split], cfg.eval.reference_samples, weights.sha256)
    val_ref = Reference(cfg, eval_split, shards[eval_split], cfg.eval.num_samples, weights.sha256)
    floor_ref = floor_reference(cfg, shards[train_split], weights.sha256, train_ref, val_ref)
    protocol = EvalProtocol.from_config(cfg, train_split=train_split, eval_split=eval_split,
                                        gfid_reference_key=train_ref.key_hash, rfid_reference_key=val_ref.key_hash,
                                        floor_reference_key=floor_ref.key_hash, fid_network=weights.protocol())
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    rec = reconstruction_phase(cfg, models, protocol, nets, shards[eval_split], real_stats=val_ref.needed)
    if val_ref.needed:  # the held-out images were read anyway: their statistics are the rFID reference
        val_ref.store(rec.real)
    timings["reconstruction_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    for r in (train_ref, floor_ref):
        if r.needed:
            r.load()  # one split serving as both: the reconstruction phase may have just stored it
    ref = reference_phase(protocol, nets, shards[train_split], fid_stats=train_ref.needed,
                          floor_stats=floor_ref.needed and floor_ref is not train_ref)
    if train_ref.needed:
        train_ref.store(ref.fid)
    if floor_ref.needed:
        floor_ref.store(ref.floor)
    floor, _ = fid_floor(floor_ref, val_ref)
    timings["reference_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    gen = generation_phase(models, protocol, nets) if models.stage2 is not None else None
    timings["generation_s"] = time.perf_counter() - t0

    prior_gen = None
    if cfg.eval.prior_gfid:
        t0 = time.perf_counter()
        prior_gen = prior_generation_phase(models, protocol, nets)
        timings["prior_generation_s"] = time.perf_counter() - t0

    pred = None
    if models.stage2 is not None and nets.i3d is not None and protocol.context_frames:
        t0 = time.perf_counter()
        pred = prediction_phase(models, protocol, nets, shards[eval_split])
        timings["prediction_s"] = time.perf_counter() - t0

    result = summarise(cfg, protocol, nets, rec, ref, gen, pred, train_ref=train_ref, val_ref=val_ref,
                       floor_ref=floor_ref, floor=floor)
    result["gfid_prior"] = fid_from_stats(train_ref.stats, prior_gen.fid) if prior_gen is not None else None
    if models.stage2 is None:
        result["gfid_unavailable_reason"] = f"{where.stage2}: no stage-2 model exported yet"
    if cfg.is_video:
        result["protocol"]["fvd"] = fvd_protocol(cfg, nets.i3d, protocol)
    result["protocol_digest"] = protocol.digest()
    return Measured(result, rec, gen, pred, timings, prior_gen)


def summarise(cfg: Config, protocol: EvalProtocol, nets: FeatureNets, rec: Reconstruction, ref: ReferencePass,
              gen: Generation | None, pred: Prediction | None, *, train_ref: Reference, val_ref: Reference,
              floor_ref: Reference, floor: float) -> dict[str, Any]:
    """The numbers of eval.json from the phases' statistics: every Fréchet distance is taken here, but the FID
    floor (reference.fid_floor: cached with the references)."""
    gfid = fvd_value = None
    fvd_reason = nets.fvd_unavailable_reason
    if gen is not None:
        gfid = fid_from_stats(train_ref.stats, gen.fid)
        if gen.i3d is not None:
            fvd_value = fid_from_stats(ref.i3d, gen.i3d)
    elif cfg.is_video and fvd_reason is None:
        fvd_reason = "no stage-2 model: nothing to generate"
    if pred is not None:
        fvd_value = fid_from_stats(rec.i3d_real, pred.i3d)
    result: dict[str, Any] = {
        "gfid": gfid, "fid_floor": floor, "rfid": fid_from_stats(val_ref.stats, rec.reconstructed),
        "psnr": rec.psnr, "psnr_unrelated": rec.psnr_unrelated, "ssim": rec.ssim,
        "chroma_real": rec.chroma_real, "chroma_reconstructed": rec.chroma_reconstructed,
        "chroma_samples": gen.chroma if gen is not None else None,
        "bits_per_pixel_prior": rec.bits_per_pixel_prior, "bits_per_pixel_base": rec.bits_per_pixel_base,
        "bits_per_subpixel_prior": rec.bits_per_subpixel_prior, "bits_per_subpixel_base": rec.bits_per_subpixel_base,
        "fvd": fvd_value, "fvd_unavailable_reason": fvd_reason if fvd_value is None else None,
        "rfvd": fid_from_stats(rec.i3d_real, rec.i3d_reconstructed) if rec.i3d_real is not None else None,
    }
    result["protocol"] = protocol.describe(cfg, num_reconstructed=rec.num_images, gfid_reference=train_ref.info,
                                           rfid_reference=val_ref.info, floor_reference=floor_ref.info)
    return result


def _publish(cfg: Config, where: Locations, result: dict[str, Any], measured: Measured, tracking) -> None:
    """eval.json, grids, plots -> storage; the same to MLflow (metrics, images, artefacts)."""
    e, rec, gen, pred = cfg.eval, measured.rec, measured.gen, measured.pred
    with tracking.stage_run(cfg, "evaluate") as run_id, tempfile.TemporaryDirectory(prefix="ul-eval-") as tmp:
        result["mlflow_run_id"] = run_id
        numbers = {k: v for k, v in result.items() if k in METRIC_KEYS and v is not None and math.isfinite(v)}
        numbers["num_samples"] = e.num_samples
        tracking.log_metrics(run_id, numbers, step=0)
        out, plots = Path(tmp) / "outputs", Path(tmp) / "plots"
        if rec.grid_real is not None:
            grid = images.paired_grid(rec.grid_real, rec.grid_reconstructed)
            images.save_png(grid, out / "reconstructions.png")
            tracking.log_image(run_id, grid, "outputs/reconstructions.png")
        if gen is not None and gen.grid is not None:
            samples = gen.grid
            grid = images.image_grid(samples[:, :, 0] if samples.ndim == 5 else samples)
            images.save_png(grid, out / "samples.png")
            tracking.log_image(run_id, grid, "outputs/samples.png")
            np.savez_compressed(out / "samples.npz", images=samples.numpy(),
                                labels=(np.arange(samples.shape[0]) % cfg.model.num_classes))
        if measured.prior_gen is not None and measured.prior_gen.grid is not None:
            samples = measured.prior_gen.grid
            grid = images.image_grid(samples[:, :, 0] if samples.ndim == 5 else samples)
            images.save_png(grid, out / "prior_samples.png")
            tracking.log_image(run_id, grid, "outputs/prior_samples.png")
        if pred is not None and pred.grid_real is not None:  # each held-out clip's row, then its prediction's row
            real, predicted = pred.grid_real, pred.grid_predicted
            grid = images.image_grid(torch.stack([real, predicted], dim=1).flatten(0, 1))
            images.save_png(grid, out / "predictions.png")
            tracking.log_image(run_id, grid, "outputs/predictions.png")
            np.savez_compressed(out / "predictions.npz", real=real.numpy(), predicted=predicted.numpy(),
                                context_frames=e.fvd_context_frames)
        current = {"run_id": run_id, **{k: result.get(k) for k in METRIC_KEYS},
                   "loss_factor": cfg.stage1.loss_factor}
        reports.write_reports(tracking.client(tracking.tracking_uri(cfg)), cfg.tracking.experiment, plots, current)
        metrics_file = Path(tmp) / "eval.json"
        metrics_file.write_text(json.dumps(result, indent=2, default=str))
        for folder, dest in ((out, where.outputs), (plots, where.plots)):
            if folder.is_dir():
                for f in sorted(folder.iterdir()):
                    storage.upload_file(str(f), storage.join(dest, f.name))
                tracking.log_artifact(run_id, folder, folder.name)
        tracking.log_artifact(run_id, metrics_file, "metrics")
        storage.write_json(where.eval_json, result)


__all__ = ["run_evaluate", "measure", "Measured", "evaluated_lineage", "summarise", "load_models", "locations",
           "Locations", "metrics_markdown", "inputs_digest", "METRIC_KEYS"]
