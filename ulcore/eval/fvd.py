"""Fréchet Video Distance: the Fréchet distance (fid.py) between I3D feature statistics of two sets of clips (the
network and its clip preparation: i3d.py), and the protocol it is reported under.

Protocol (`fvd_protocol`, logged with the number). eval.fvd_context_frames = 0: clips generated unconditionally,
compared with training clips. c > 0: frame prediction as in the Kinetics-600 setup (UL §5.7 after Video Diffusion
Models, Ho et al. 2022: 16 frames at 128², 5 given, 11 generated; `predicted_clips`): sample i continues held-out
clip i mod N_val from its first c real frames by training-free replacement conditioning (ulcore.diffusion.sampling),
and FVD compares the full T-frame clips, context included, with those held-out clips.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from ulcore.eval.fid import FeatureStats, fid_from_stats, feature_statistics
from ulcore.eval.i3d import I3D_MIN_FRAMES, I3D_SIZE, I3DFeatures, I3DUnavailable
from ulcore.eval.protocol import EvalProtocol


def fvd(real_clips: torch.Tensor, fake_clips: torch.Tensor, weights: str, *,
        batch_size: int = 4) -> tuple[float | None, dict]:
    """(FVD, info). FVD is None and info["fvd_unavailable_reason"] says why when the weights are missing."""
    try:
        net = I3DFeatures(weights, batch_size=batch_size)
    except I3DUnavailable as exc:
        return None, {"fvd_unavailable_reason": str(exc)}
    real, fake = feature_statistics(net(real_clips)), feature_statistics(net(fake_clips))
    value = fid_from_stats(real, fake)
    info = {"i3d_weights": weights, "i3d_sha256": net.sha256, "i3d_format": net.kind,
            "fvd_num_real": real.n, "fvd_num_fake": fake.n,
            "fvd_frames": max(int(real_clips.shape[2]), I3D_MIN_FRAMES), "fvd_resolution": I3D_SIZE}
    return (value if math.isfinite(value) else None), info


def fvd_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    return fid_from_stats(a, b)


# --------------------------------------------------------------------------------------- frame prediction


def predicted_clips(stage1, stage2, held_out: Callable[[], Iterable[dict]],
                    protocol: EvalProtocol) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(real, predicted) uint8 clip batches for N = protocol.num_samples samples: sample i continues held-out clip
    i mod N_val (`held_out()` yields the split in shard order; it is read again when the split is shorter) from its
    first protocol.context_frames frames, with per-sample seeds from (protocol.prediction_seed, i) and the null class
    label (frames are the only conditioning, as in the frame-prediction literature). predicted[:, :, :c] equals
    real[:, :, :c] exactly: the decoder's replacement ends on the real frames, which round-trip through float."""
    from ulcore.data.loaders import to_float, to_uint8
    from ulcore.diffusion.sampling import generate

    p, c = protocol, protocol.context_frames
    device = next(stage2.base.parameters()).device
    done = 0
    while done < p.num_samples:
        before = done
        for batch in held_out():
            real = torch.as_tensor(batch["x"][: p.num_samples - done])
            if real.shape[0] == 0:
                break
            labels = torch.full((real.shape[0],), p.num_classes, dtype=torch.int64, device=device)
            predicted = generate(stage1, stage2, labels, seed=p.prediction_seed, sampler=p.sampler,
                                 base_steps=p.base_steps, decoder_steps=p.decoder_steps, guidance=p.guidance,
                                 guidance_interval=p.guidance_interval, indices=range(done, done + real.shape[0]),
                                 context=to_float(real[:, :, :c].to(device)),
                                 reconstruction_guidance=p.reconstruction_guidance)
            yield real, to_uint8(predicted).cpu()
            done += real.shape[0]
        if done == before:
            raise ValueError("frame prediction: the held-out split has no clips to take the context from")


def fvd_protocol(cfg, i3d: I3DFeatures | None, protocol: EvalProtocol) -> dict[str, Any]:
    """The FVD protocol fields logged with the number (eval.json, MLflow)."""
    m, c = cfg.model, protocol.context_frames
    train_split, eval_split = protocol.train_split, protocol.eval_split
    common = {"weights": cfg.eval.i3d_weights, "sha256": getattr(i3d, "sha256", None),
              "format": getattr(i3d, "kind", None), "min_frames": I3D_MIN_FRAMES, "resolution": I3D_SIZE,
              "frames": m.frames}
    if c == 0:
        return {**common, "reference": f"{train_split} clips", "context_frames": 0, "generated_frames": m.frames,
                "context_included": False, "conditioning": "none (unconditional clips, labels i mod num_classes)",
                "summary": f"unconditional {m.frames}-frame clips vs {train_split} clips"}
    latent, w = c // m.temporal_downsample, protocol.reconstruction_guidance
    seed = protocol.prediction_seed
    return {**common, "reference": f"{eval_split} clips (the clips the context comes from)",
            "context_frames": c, "generated_frames": m.frames - c, "context_included": True,
            "conditioning": f"replacement (Ho et al. 2022 §3.1): latent frames 0..{latent - 1} in the base model, "
                            f"pixel frames 0..{c - 1} in the decoder",
            "reconstruction_guidance": w,
            "context_latent_frames": latent, "context_pixel_only_frames": c - latent * m.temporal_downsample,
            "context_encoding": f"first {c} frames held on the last one to {m.frames} frames, then encoded",
            "clips": f"sample i continues {eval_split} clip i mod N_val; noise sample_seeds({seed} + j, i), "
                     "j = 0..3; null class label",
            "summary": f"{c} real + {m.frames - c} generated frames, replacement conditioning"
                       + (f" + reconstruction guidance {w:g}" if w else "")
                       + f", FVD on all {m.frames} frames (context included) vs {eval_split} clips"}

__all__ = ["fvd", "fvd_from_stats", "predicted_clips", "fvd_protocol"]
