"""The phases of the evaluate stage (evaluate.py states the protocol). Each is a plain function of the config, the
models, the protocol and the feature networks that returns a small dataclass of feature statistics, per-image means
and grid images, so it can run anywhere (a Ray task, later) and the distances are taken once, by the caller:

- reconstruction: the first N held-out images -> PSNR, SSIM, both bitrates, reconstruction statistics for rFID (and
  the held-out images' own statistics when the rFID reference is not cached yet, and I3D statistics for video);
- reference: the training split's statistics for gFID and for the FID floor when not cached, and I3D statistics of
  the first N training clips for unconditional FVD;
- generation: N base-model samples -> statistics for gFID (and unconditional FVD);
- prior generation (eval.prior_gfid): N samples with the stage-1 prior in place of the base model -> gfid_prior;
- prediction: N clips continued from held-out context frames -> I3D statistics for frame-prediction FVD.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ulcore.config import Config
from ulcore.data.loaders import eval_batches, to_float, to_uint8
from ulcore.diffusion.bitrate import base_bits_per_pixel, prior_bits_per_pixel
from ulcore.diffusion.losses import bits_per_subpixel
from ulcore.diffusion.sampling import generate, generate_from_prior, reconstruct
from ulcore.eval.fid import FeatureStats, RunningStats
from ulcore.eval.fvd import predicted_clips
from ulcore.eval.i3d import I3DFeatures, I3DUnavailable
from ulcore.eval.image_metrics import chroma, psnr, ssim
from ulcore.eval.inception import FidFeatureExtractor, WeightsSource, extractor_on
from ulcore.eval.protocol import EvalProtocol
from ulcore.eval.reference import frames, take


@dataclass
class Models:
    """The exported EMA models on the evaluation device; no stage-2 model before stage 2 has been exported."""
    stage1: torch.nn.Module
    stage2: torch.nn.Module | None
    device: torch.device


@dataclass
class FeatureNets:
    """The metric networks: the FID InceptionV3, and I3D for video (None, with the reason, when unavailable)."""
    fid: FidFeatureExtractor
    i3d: I3DFeatures | None
    fvd_unavailable_reason: str | None


@dataclass
class Reconstruction:
    num_images: int
    psnr: float | None
    psnr_unrelated: float | None  # each held-out image against its batch neighbour: a reconstruction that kept nothing
    ssim: float | None
    chroma_real: float | None  # image_metrics.chroma: colour the held-out images have (0 when grey)
    chroma_reconstructed: float | None  # ... and their reconstructions
    bits_per_pixel_prior: float | None
    bits_per_pixel_base: float | None
    bits_per_subpixel_prior: float | None
    bits_per_subpixel_base: float | None
    reconstructed: FeatureStats  # FID features of the reconstructions
    real: FeatureStats | None  # FID features of the held-out images (only when asked: the rFID reference)
    i3d_real: FeatureStats | None
    i3d_reconstructed: FeatureStats | None
    grid_real: torch.Tensor | None
    grid_reconstructed: torch.Tensor | None


@dataclass
class ReferencePass:
    fid: FeatureStats | None  # the gFID reference (only when asked: not cached)
    floor: FeatureStats | None  # the first N training images, the FID floor's training side (only when asked)
    i3d: FeatureStats | None  # the first N training clips (unconditional FVD)


@dataclass
class Generation:
    fid: FeatureStats
    i3d: FeatureStats | None
    grid: torch.Tensor | None
    chroma: float | None  # image_metrics.chroma of the samples


@dataclass
class Prediction:
    i3d: FeatureStats
    num_clips: int
    grid_real: torch.Tensor | None
    grid_predicted: torch.Tensor | None


def feature_nets(cfg: Config, device: torch.device, weights: WeightsSource) -> FeatureNets:
    """The FID network on `device`; I3D too for a video model (FVD is None with the reason when it cannot load)."""
    fid = extractor_on(device, weights, cfg.eval.batch_size)
    if not cfg.is_video:
        return FeatureNets(fid, None, "not a video model")
    try:
        i3d = I3DFeatures(cfg.eval.i3d_weights, batch_size=4 if device.type == "cpu" else 16, device=str(device))
        return FeatureNets(fid, i3d, None)
    except I3DUnavailable as exc:
        return FeatureNets(fid, None, str(exc))


def _progress(phase: str, done: int, total: int) -> None:
    """One status line per batch: evaluation runs minutes on a CPU and should not look stuck."""
    print(f"[evaluate] {phase}: {done}/{total}", flush=True)


def _keep(parts: list[torch.Tensor], batch: torch.Tensor, limit: int) -> None:
    """Collect grid images batch by batch until `limit` are held."""
    if sum(p.shape[0] for p in parts) < limit:
        parts.append(batch)


def _grid(parts: list[torch.Tensor], limit: int) -> torch.Tensor | None:
    return torch.cat(parts)[:limit] if parts else None


def _mean(parts: list[torch.Tensor]) -> float | None:
    return float(torch.cat(parts).double().mean()) if parts else None


def _stats(running: RunningStats, needed: bool) -> FeatureStats | None:
    return running.stats() if needed else None


def _batches(uris: list[str], protocol: EvalProtocol) -> Iterator[dict]:
    """A split's images in shard order, protocol.batch_size at a time."""
    return eval_batches(uris, batch_size=protocol.batch_size, kind="images")


def reconstruction_phase(cfg: Config, models: Models, protocol: EvalProtocol, nets: FeatureNets,
                         held_out: list[str], *, real_stats: bool) -> Reconstruction:
    """The first N held-out images, reconstructed with seed protocol.reconstruction_seed (decoder_steps, sampler):
    PSNR / SSIM per image (and PSNR of each image against its batch neighbour, the score of a reconstruction that
    kept nothing of its input), the prior's and the base model's bitrate (docs/method.md (M9)), FID (and I3D)
    features."""
    p, stage1, stage2, i3d = protocol, models.stage1, models.stage2, nets.i3d
    real, rec, i3d_real, i3d_rec = RunningStats(), RunningStats(), RunningStats(), RunningStats()
    psnrs, unrelated, ssims, bpp_prior, bpp_base, grid_real, grid_rec = [], [], [], [], [], [], []
    chroma_real, chroma_rec = [], []
    n = 0
    for start, batch in take(_batches(held_out, p), p.num_samples):
        x_u8, labels = batch["x"], batch["cls"].to(models.device)
        x = to_float(x_u8.to(models.device))
        rec_u8 = to_uint8(reconstruct(stage1, x, seed=p.reconstruction_seed, steps=p.decoder_steps,
                                      sampler=p.sampler, indices=range(start, start + x.shape[0]))).cpu()
        psnrs.append(psnr(rec_u8, x_u8))
        if x_u8.shape[0] > 1:
            unrelated.append(psnr(x_u8.roll(1, dims=0), x_u8))
        ssims.append(ssim(rec_u8, x_u8))
        chroma_real.append(chroma(x_u8))
        chroma_rec.append(chroma(rec_u8))
        bpp_prior.append(prior_bits_per_pixel(stage1, x, seed=p.bits_seed + start))
        if stage2 is not None:
            bpp_base.append(base_bits_per_pixel(stage1, stage2, x, labels, seed=p.bits_seed + start))
        if real_stats:
            real.add(nets.fid(frames(x_u8)))
        rec.add(nets.fid(frames(rec_u8)))
        if i3d is not None:
            i3d_real.add(i3d(x_u8))
            i3d_rec.add(i3d(rec_u8))
        _keep(grid_real, x_u8, p.grid_size)
        _keep(grid_rec, rec_u8, p.grid_size)
        n += x.shape[0]
        _progress("reconstructions", n, p.num_samples)
    channels = cfg.model.in_channels
    return Reconstruction(
        num_images=n, psnr=_mean(psnrs), psnr_unrelated=_mean(unrelated), ssim=_mean(ssims),
        chroma_real=_mean(chroma_real), chroma_reconstructed=_mean(chroma_rec), bits_per_pixel_prior=_mean(bpp_prior),
        bits_per_pixel_base=_mean(bpp_base),
        bits_per_subpixel_prior=_mean([bits_per_subpixel(b, channels) for b in bpp_prior]),
        bits_per_subpixel_base=_mean([bits_per_subpixel(b, channels) for b in bpp_base]),
        reconstructed=rec.stats(), real=_stats(real, real_stats),
        i3d_real=_stats(i3d_real, i3d is not None), i3d_reconstructed=_stats(i3d_rec, i3d is not None),
        grid_real=_grid(grid_real, p.grid_size), grid_reconstructed=_grid(grid_rec, p.grid_size))


def reference_phase(protocol: EvalProtocol, nets: FeatureNets, train: list[str], *, fid_stats: bool,
                    floor_stats: bool = False) -> ReferencePass:
    """One pass over the training split: its first reference_samples images (0 = all) for gFID when `fid_stats`
    (not cached), its first N for the FID floor when `floor_stats`, and I3D features of its first N clips for
    unconditional FVD (frame prediction compares with held-out clips)."""
    p = protocol
    n_fid = (p.reference_samples or sys.maxsize) if fid_stats else 0
    n_floor = p.num_samples if floor_stats else 0
    n_fvd = p.num_samples if nets.i3d is not None and not p.context_frames else 0
    fid, floor, i3d = RunningStats(), RunningStats(), RunningStats()
    if n_fid or n_floor or n_fvd:
        for start, batch in take(_batches(train, p), max(n_fid, n_floor, n_fvd)):
            if start < n_fid:
                fid.add(nets.fid(frames(batch["x"][:n_fid - start])))
            if start < n_floor:
                floor.add(nets.fid(frames(batch["x"][:n_floor - start])))
            if start < n_fvd:
                i3d.add(nets.i3d(batch["x"][:n_fvd - start]))
    return ReferencePass(fid=_stats(fid, fid_stats), floor=_stats(floor, floor_stats), i3d=_stats(i3d, bool(n_fvd)))


def generation_phase(models: Models, protocol: EvalProtocol, nets: FeatureNets) -> Generation:
    """N base-model samples, class-balanced labels (i mod num_classes), sample i seeded by
    sample_seeds(protocol.generation_seed, i): FID features (and I3D features for unconditional FVD)."""
    p = protocol
    with_i3d = nets.i3d is not None and not p.context_frames
    stats, i3d, grid, colour = RunningStats(), RunningStats(), [], []
    labels_all = torch.arange(p.num_samples, dtype=torch.int64, device=models.device) % p.num_classes
    for start in range(0, p.num_samples, p.batch_size):
        labels = labels_all[start:start + p.batch_size]
        g_u8 = to_uint8(generate(models.stage1, models.stage2, labels, seed=p.generation_seed, sampler=p.sampler,
                                 base_steps=p.base_steps, decoder_steps=p.decoder_steps, guidance=p.guidance,
                                 guidance_interval=p.guidance_interval,
                                 indices=range(start, start + labels.shape[0]))).cpu()
        stats.add(nets.fid(frames(g_u8)))
        colour.append(chroma(g_u8))
        if with_i3d:
            i3d.add(nets.i3d(g_u8))
        _keep(grid, g_u8, p.grid_size)
        _progress("samples", start + labels.shape[0], p.num_samples)
    return Generation(fid=stats.stats(), i3d=_stats(i3d, with_i3d), grid=_grid(grid, p.grid_size),
                      chroma=_mean(colour))


def prior_generation_phase(models: Models, protocol: EvalProtocol, nets: FeatureNets) -> Generation:
    """N samples of the stage-1 prior decoded to pixels, sample i seeded by sample_seeds(protocol.prior_seed, i),
    the base model's steps and sampler: FID features, the other side of UL §3.3's base-model-vs-prior comparison."""
    p, stats, grid, colour = protocol, RunningStats(), [], []
    for start in range(0, p.num_samples, p.batch_size):
        idx = range(start, min(start + p.batch_size, p.num_samples))
        g_u8 = to_uint8(generate_from_prior(models.stage1, len(idx), seed=p.prior_seed, sampler=p.sampler,
                                            prior_steps=p.base_steps, decoder_steps=p.decoder_steps, indices=idx,
                                            device=models.device)).cpu()
        stats.add(nets.fid(frames(g_u8)))
        colour.append(chroma(g_u8))
        _keep(grid, g_u8, p.grid_size)
        _progress("prior samples", idx.stop, p.num_samples)
    return Generation(fid=stats.stats(), i3d=None, grid=_grid(grid, p.grid_size), chroma=_mean(colour))


def prediction_phase(models: Models, protocol: EvalProtocol, nets: FeatureNets, held_out: list[str]) -> Prediction:
    """Frame prediction (protocol.context_frames > 0): N clips continued from the held-out clips' first frames
    (fvd.predicted_clips) -> I3D features of the full clips, context included."""
    stats, grid_real, grid_pred, n = RunningStats(), [], [], 0
    for real_u8, pred_u8 in predicted_clips(models.stage1, models.stage2, lambda: _batches(held_out, protocol),
                                            protocol):
        stats.add(nets.i3d(pred_u8))
        _keep(grid_real, real_u8, protocol.grid_size)
        _keep(grid_pred, pred_u8, protocol.grid_size)
        n += real_u8.shape[0]
        _progress("predictions", n, protocol.num_samples)
    return Prediction(i3d=stats.stats(), num_clips=n, grid_real=_grid(grid_real, protocol.grid_size),
                      grid_predicted=_grid(grid_pred, protocol.grid_size))


__all__ = ["Models", "FeatureNets", "Reconstruction", "ReferencePass", "Generation", "Prediction", "feature_nets",
           "reconstruction_phase", "reference_phase", "generation_phase", "prior_generation_phase",
           "prediction_phase"]
