"""The evaluate stage: gFID, rFID, PSNR, SSIM, both bitrates (and FVD for video) under a pinned protocol.

Protocol (all from `eval.*`, logged with every number):
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
- num_samples < 10000 is a *monitoring* evaluation: FID is biased upwards at small N and is not comparable to
  published 50k-sample numbers; eval.json says so.
Rerun with nothing changed does no work: eval.json stores a digest of every input (models, shards, params,
metric weights) and is returned as is when it matches.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ulcore import images, storage
from ulcore.config import Config
from ulcore.eval import reports
from ulcore.eval.fid import RunningStats, data_fingerprint, fid_from_stats
from ulcore.eval.fvd import fvd_protocol, predicted_clips
from ulcore.eval.i3d import I3DFeatures, I3DUnavailable
from ulcore.eval.image_metrics import psnr, ssim
from ulcore.eval.inception import extractor_on, resolve_fid_weights
from ulcore.eval.reference import Reference, frames, splits, take

MONITORING_BELOW = 10_000  # FID from fewer samples is labelled "monitoring"
METRIC_KEYS = ("gfid", "rfid", "psnr", "ssim", "bits_per_pixel_prior", "bits_per_pixel_base",
               "bits_per_subpixel_prior", "bits_per_subpixel_base", "fvd")
RECON_SEED_OFFSET = 2  # generate() uses seed and seed + 1; reconstructions use seed + 2 and seed + 3
BITS_SEED_OFFSET = 4


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


def _progress(phase: str, done: int, total: int) -> None:
    """One status line per batch: evaluation runs minutes on a CPU and should not look stuck."""
    print(f"[evaluate] {phase}: {done}/{total}", flush=True)


def run_evaluate(cfg: Config) -> dict[str, Any]:
    """Evaluate the exported models; writes metrics/eval.json, plots/, outputs/ and an MLflow run."""
    from ulcore import tracking
    from ulcore.data.loaders import eval_batches, shard_uris, to_float, to_uint8
    from ulcore.diffusion.losses import bits_per_subpixel
    from ulcore.diffusion.bitrate import base_bits_per_pixel, prior_bits_per_pixel
    from ulcore.diffusion.sampling import generate, reconstruct
    from ulcore.train.export import load_stage1, load_stage2, stage1_root, stage2_root
    from ulcore.train.precision import compute_device

    storage.use_endpoint(cfg.storage.s3_endpoint)
    root, e = cfg.storage.root, cfg.eval
    t_start = time.perf_counter()
    train_split, eval_split = splits(cfg)
    shards = {train_split: shard_uris(cfg, "images", train_split), eval_split: shard_uris(cfg, "images", eval_split)}
    weights = resolve_fid_weights(e.fid_weights)
    roots = {"stage1": stage1_root(cfg)}
    has_stage2 = storage.exists(storage.join(stage2_root(cfg), "config.yaml"))
    if has_stage2:
        roots["stage2"] = stage2_root(cfg)
    digest = inputs_digest(cfg, roots, shards, weights.sha256)
    eval_uri = storage.join(root, "metrics", "eval.json")
    if storage.exists(eval_uri):
        previous = storage.read_json(eval_uri)
        if previous.get("inputs_digest") == digest:
            return {**previous, "skipped": True, "markdown": metrics_markdown(previous)}

    device = compute_device(cfg)
    extractor = extractor_on(device, weights, e.batch_size)
    stage1 = load_stage1(roots["stage1"]).to(device)
    stage2 = load_stage2(roots["stage2"]).to(device) if has_stage2 else None
    n = e.num_samples
    timings: dict[str, float] = {}
    try:
        i3d: I3DFeatures | None = (I3DFeatures(e.i3d_weights, batch_size=4 if device.type == "cpu" else 16,
                                               device=str(device)) if cfg.is_video else None)
        fvd_reason = None if cfg.is_video else "not a video model"
    except I3DUnavailable as exc:
        i3d, fvd_reason = None, str(exc)

    # --- held-out images: reconstructions, PSNR / SSIM, bitrates, rFID (and FVD reference clips)
    t0 = time.perf_counter()
    val_ref = Reference(cfg, eval_split, shards[eval_split], n, weights.sha256)
    rec_stats, i3d_real, i3d_rec = RunningStats(), RunningStats(), RunningStats()
    psnrs, ssims, bpp_prior, bpp_base = [], [], [], []
    grid_real, grid_rec = [], []
    n_val = 0
    for start, batch in take(eval_batches(shards[eval_split], batch_size=e.batch_size, kind="images"), n):
        x_u8, labels = batch["x"], batch["cls"].to(device)
        x = to_float(x_u8.to(device))
        idx = range(start, start + x.shape[0])
        rec_u8 = to_uint8(reconstruct(stage1, x, seed=e.seed + RECON_SEED_OFFSET, steps=e.decoder_steps,
                                      sampler=e.sampler, indices=idx)).cpu()
        psnrs.append(psnr(rec_u8, x_u8))
        ssims.append(ssim(rec_u8, x_u8))
        bpp_prior.append(prior_bits_per_pixel(stage1, x, seed=e.seed + BITS_SEED_OFFSET + start))
        if stage2 is not None:
            bpp_base.append(base_bits_per_pixel(stage1, stage2, x, labels, seed=e.seed + BITS_SEED_OFFSET + start))
        if val_ref.running is not None:
            val_ref.running.add(extractor(frames(x_u8)))
        rec_stats.add(extractor(frames(rec_u8)))
        if i3d is not None:
            i3d_real.add(i3d(x_u8))
            i3d_rec.add(i3d(rec_u8))
        if sum(g.shape[0] for g in grid_real) < e.grid_size:
            grid_real.append(x_u8)
            grid_rec.append(rec_u8)
        n_val += x.shape[0]
        _progress("reconstructions", n_val, n)
    val_ref.finish(n_val)
    timings["reconstruction_s"] = time.perf_counter() - t0

    # --- training-split reference statistics for gFID: the first eval.reference_samples images, 0 = all (cached
    # after the first run); unconditional FVD's reference is the first num_samples training clips (frame
    # prediction compares with the held-out clips the context came from instead)
    t0 = time.perf_counter()
    train_ref = Reference(cfg, train_split, shards[train_split], e.reference_samples, weights.sha256)
    i3d_train = RunningStats()
    n_train = 0
    n_fid = (e.reference_samples or sys.maxsize) if train_ref.running is not None else 0
    n_fvd = n if i3d is not None and not e.fvd_context_frames else 0
    if n_fid or n_fvd:
        for start, batch in take(eval_batches(shards[train_split], batch_size=e.batch_size, kind="images"),
                                  max(n_fid, n_fvd)):
            if start < n_fid:
                x_ref = batch["x"][:n_fid - start]
                train_ref.running.add(extractor(frames(x_ref)))
                n_train += x_ref.shape[0]
            if start < n_fvd:
                i3d_train.add(i3d(batch["x"][:n_fvd - start]))
    train_ref.finish(n_train)
    timings["reference_s"] = time.perf_counter() - t0

    # --- generation: gFID (and FVD against the training clips)
    t0 = time.perf_counter()
    gfid = fvd_value = None
    grid_gen: list[torch.Tensor] = []
    if stage2 is not None:
        gen_stats, i3d_gen = RunningStats(), RunningStats()
        labels_all = torch.arange(n, dtype=torch.int64, device=device) % cfg.model.num_classes
        for start in range(0, n, e.batch_size):
            labels = labels_all[start:start + e.batch_size]
            g_u8 = to_uint8(generate(stage1, stage2, labels, seed=e.seed, sampler=e.sampler, base_steps=e.base_steps,
                                     decoder_steps=e.decoder_steps, guidance=e.guidance,
                                     guidance_interval=e.guidance_interval,
                                     indices=range(start, start + labels.shape[0]))).cpu()
            gen_stats.add(extractor(frames(g_u8)))
            if i3d is not None and not e.fvd_context_frames:
                i3d_gen.add(i3d(g_u8))
            if sum(g.shape[0] for g in grid_gen) < e.grid_size:
                grid_gen.append(g_u8)
            _progress("samples", start + labels.shape[0], n)
        gfid = fid_from_stats(train_ref.stats, gen_stats.stats())
        if i3d is not None and not e.fvd_context_frames:
            fvd_value = fid_from_stats(i3d_train.stats(), i3d_gen.stats())
    elif cfg.is_video and fvd_reason is None:
        fvd_reason = "no stage-2 model: nothing to generate"
    timings["generation_s"] = time.perf_counter() - t0

    # --- FVD as frame prediction (eval.fvd_context_frames > 0): held-out clips' first frames in, the rest generated
    grid_pred: list[tuple[torch.Tensor, torch.Tensor]] = []
    if stage2 is not None and i3d is not None and e.fvd_context_frames:
        t0 = time.perf_counter()
        i3d_pred, n_pred = RunningStats(), 0
        held_out = lambda: eval_batches(shards[eval_split], batch_size=e.batch_size, kind="images")  # noqa: E731
        for real_u8, pred_u8 in predicted_clips(stage1, stage2, held_out, cfg):
            i3d_pred.add(i3d(pred_u8))
            if sum(r.shape[0] for r, _ in grid_pred) < e.grid_size:
                grid_pred.append((real_u8, pred_u8))
            n_pred += real_u8.shape[0]
            _progress("predictions", n_pred, n)
        fvd_value = fid_from_stats(i3d_real.stats(), i3d_pred.stats())
        timings["prediction_s"] = time.perf_counter() - t0

    rfid = fid_from_stats(val_ref.stats, rec_stats.stats())
    mean = lambda parts: float(torch.cat(parts).double().mean()) if parts else None  # noqa: E731
    result: dict[str, Any] = {
        "gfid": gfid, "rfid": rfid, "psnr": mean(psnrs), "ssim": mean(ssims),
        "bits_per_pixel_prior": mean(bpp_prior), "bits_per_pixel_base": mean(bpp_base),
        "bits_per_subpixel_prior": mean([bits_per_subpixel(b, cfg.model.in_channels) for b in bpp_prior]),
        "bits_per_subpixel_base": mean([bits_per_subpixel(b, cfg.model.in_channels) for b in bpp_base]),
        "fvd": fvd_value, "fvd_unavailable_reason": fvd_reason if fvd_value is None else None,
        "rfvd": fid_from_stats(i3d_real.stats(), i3d_rec.stats()) if i3d is not None and n_val >= 2 else None,
    }
    if stage2 is None:
        result["gfid_unavailable_reason"] = f"{stage2_root(cfg)}: no stage-2 model exported yet"
    monitoring = n < MONITORING_BELOW
    result["protocol"] = {
        "num_samples": n, "num_reconstructed": n_val, "seed": e.seed,
        "seeds": {"generate": f"sample_seeds({e.seed}, 0..{n - 1}) and {e.seed + 1}",
                  "reconstruct": e.seed + RECON_SEED_OFFSET, "bits": f"{e.seed + BITS_SEED_OFFSET} + batch start"},
        "labels": "i mod num_classes", "sampler": e.sampler, "base_steps": e.base_steps,
        "decoder_steps": e.decoder_steps, "guidance": e.guidance, "guidance_interval": list(e.guidance_interval),
        "ema": True, "train_split": train_split, "eval_split": eval_split, "resolution": cfg.data.resolution,
        **weights.protocol(), "ssim": "torchmetrics gaussian 11x11 sigma 1.5",
        "psnr": "per image on [0,255] after clipping, mean over images",
        "bits_per_pixel": "ELBO bound / (ln 2 * H * W * frames), 4 stratified draws per image",
        "bits_per_subpixel": f"bits_per_pixel / {cfg.model.in_channels} channels (the VDM convention)",
        "reference_samples": e.reference_samples, "gfid_reference": train_ref.info, "rfid_reference": val_ref.info,
        "monitoring": monitoring,
        "monitoring_note": (f"monitoring FID: N = {n} < {MONITORING_BELOW}; biased upwards, not comparable to "
                            "50k-sample published numbers") if monitoring else "",
    }
    if cfg.is_video:
        result["protocol"]["fvd"] = fvd_protocol(cfg, i3d, train_split=train_split, eval_split=eval_split)
    result["inputs_digest"] = digest
    timings["total_s"] = time.perf_counter() - t_start
    result["timings"] = {k: round(v, 2) for k, v in timings.items()}
    _publish(cfg, result, grid_real, grid_rec, grid_gen, tracking, grid_pred)
    result["markdown"] = metrics_markdown(result)
    return result


def _publish(cfg: Config, result: dict[str, Any], grid_real, grid_rec, grid_gen, tracking, grid_pred=()) -> None:
    """eval.json, grids, plots -> storage; the same to MLflow (metrics, images, artefacts)."""
    root, e = cfg.storage.root, cfg.eval
    with tracking.stage_run(cfg, "evaluate") as run_id, tempfile.TemporaryDirectory(prefix="ul-eval-") as tmp:
        result["mlflow_run_id"] = run_id
        numbers = {k: v for k, v in result.items() if k in METRIC_KEYS and v is not None and math.isfinite(v)}
        numbers["num_samples"] = e.num_samples
        tracking.log_metrics(run_id, numbers, step=0)
        out, plots = Path(tmp) / "outputs", Path(tmp) / "plots"
        if grid_real:
            real = torch.cat(grid_real)[:e.grid_size]
            rec = torch.cat(grid_rec)[:e.grid_size]
            grid = images.paired_grid(real, rec)
            images.save_png(grid, out / "reconstructions.png")
            tracking.log_image(run_id, grid, "outputs/reconstructions.png")
        if grid_gen:
            gen = torch.cat(grid_gen)[:e.grid_size]
            grid = images.image_grid(gen[:, :, 0] if gen.ndim == 5 else gen)
            images.save_png(grid, out / "samples.png")
            tracking.log_image(run_id, grid, "outputs/samples.png")
            np.savez_compressed(out / "samples.npz", images=gen.numpy(),
                                labels=(np.arange(gen.shape[0]) % cfg.model.num_classes))
        if grid_pred:  # frame prediction: each held-out clip's row, then its prediction's row (one frame a column)
            real = torch.cat([r for r, _ in grid_pred])[:e.grid_size]
            pred = torch.cat([q for _, q in grid_pred])[:e.grid_size]
            grid = images.image_grid(torch.stack([real, pred], dim=1).flatten(0, 1))
            images.save_png(grid, out / "predictions.png")
            tracking.log_image(run_id, grid, "outputs/predictions.png")
            np.savez_compressed(out / "predictions.npz", real=real.numpy(), predicted=pred.numpy(),
                                context_frames=e.fvd_context_frames)
        current = {"run_id": run_id, **{k: result.get(k) for k in METRIC_KEYS},
                   "loss_factor": cfg.stage1.loss_factor}
        reports.write_reports(tracking.client(tracking.tracking_uri(cfg)), cfg.tracking.experiment, plots, current)
        metrics_file = Path(tmp) / "eval.json"
        metrics_file.write_text(json.dumps(result, indent=2, default=str))
        for folder, dest in ((out, "outputs"), (plots, "plots")):
            if folder.is_dir():
                for f in sorted(folder.iterdir()):
                    storage.upload_file(str(f), storage.join(root, dest, f.name))
                tracking.log_artifact(run_id, folder, dest)
        tracking.log_artifact(run_id, metrics_file, "metrics")
        storage.write_json(storage.join(root, "metrics", "eval.json"), result)


__all__ = ["run_evaluate", "metrics_markdown", "inputs_digest", "MONITORING_BELOW", "METRIC_KEYS"]
