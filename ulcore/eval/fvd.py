"""Fréchet Video Distance on I3D (Kinetics-400) features, from a weights file the user supplies.

Two files are accepted (`eval.i3d_weights`), detected by format:
- `i3d_pretrained_400.pt` (VideoGPT / TATS): a state dict for the InceptionI3d layout below (Carreira & Zisserman
  2017, Fig. 3; module names Conv3d_1a_7x7 ... Mixed_5c, logits). Features = the 400 logits averaged over time.
- StyleGAN-V's `i3d_torchscript.pt`: called as `net(x, rescale=False, resize=False, return_features=True)`.
Both get clips as float (N, 3, T, 224, 224) in [-1, 1]: frames bilinearly resized to 224² (align_corners=False),
clips shorter than 16 frames repeated nearest-in-time to 16 (the network's temporal receptive field; recorded
in the protocol). No file, or a file that fails to load: FVD is None with the reason - never a number from a
stand-in network.

Protocol (`fvd_protocol`, logged with the number). eval.fvd_context_frames = 0: clips generated unconditionally,
compared with training clips. c > 0: frame prediction as in the Kinetics-600 setup (UL §5.7 after Video Diffusion
Models, Ho et al. 2022: 16 frames at 128², 5 given, 11 generated; `predicted_clips`): sample i continues held-out
clip i mod N_val from its first c real frames by training-free replacement conditioning (ulcore.diffusion.sampling),
and FVD compares the full T-frame clips, context included, with those held-out clips.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ulcore.eval.fid import FeatureStats, fid_from_stats, feature_statistics
from ulcore.eval.inception import file_sha256, full_fp32_convolutions, is_torchscript

I3D_SIZE = 224
I3D_MIN_FRAMES = 16
NUM_CLASSES = 400
PREDICTION_SEED_OFFSET = 5  # predicted clips use noise streams eval.seed + 5 .. + 8 (generate() takes four)


def _same_pad(size: int, k: int, s: int) -> tuple[int, int]:
    """TF 'SAME' padding for one dimension: total = max(k - s, 0) or max(k - size % s, 0), front gets the floor."""
    total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    (pt, pt2), (ph, ph2), (pw, pw2) = (_same_pad(x.shape[2 + i], kernel[i], stride[i]) for i in range(3))
    return F.pad(x, (pw, pw2, ph, ph2, pt, pt2))


class Unit3D(nn.Module):
    """Conv3d with TF 'SAME' padding, optional BatchNorm (eps 1e-3) and ReLU."""

    def __init__(self, cin: int, cout: int, kernel=(1, 1, 1), stride=(1, 1, 1), *, bn: bool = True,
                 relu: bool = True, bias: bool = False) -> None:
        super().__init__()
        self.kernel, self.stride, self.relu = tuple(kernel), tuple(stride), relu
        self.conv3d = nn.Conv3d(cin, cout, self.kernel, self.stride, padding=0, bias=bias)
        self.bn = nn.BatchNorm3d(cout, eps=1e-3, momentum=0.01) if bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class MaxPoolSame(nn.Module):
    def __init__(self, kernel, stride) -> None:
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionBlock(nn.Module):
    """Four branches: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 | maxpool 3x3 -> 1x1, concatenated on channels."""

    def __init__(self, cin: int, c: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        self.b0 = Unit3D(cin, c[0])
        self.b1a, self.b1b = Unit3D(cin, c[1]), Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(cin, c[3]), Unit3D(c[3], c[4], (3, 3, 3))
        self.b3a, self.b3b = MaxPoolSame((3, 3, 3), (1, 1, 1)), Unit3D(cin, c[5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


# (name, kind, args) in forward order; channel plan of Inception-v1 inflated to 3D (I3D paper, Fig. 3).
_PLAN = [
    ("Conv3d_1a_7x7", "conv", (3, 64, (7, 7, 7), (2, 2, 2))),
    ("MaxPool3d_2a_3x3", "pool", ((1, 3, 3), (1, 2, 2))),
    ("Conv3d_2b_1x1", "conv", (64, 64, (1, 1, 1), (1, 1, 1))),
    ("Conv3d_2c_3x3", "conv", (64, 192, (3, 3, 3), (1, 1, 1))),
    ("MaxPool3d_3a_3x3", "pool", ((1, 3, 3), (1, 2, 2))),
    ("Mixed_3b", "mix", (192, (64, 96, 128, 16, 32, 32))),
    ("Mixed_3c", "mix", (256, (128, 128, 192, 32, 96, 64))),
    ("MaxPool3d_4a_3x3", "pool", ((3, 3, 3), (2, 2, 2))),
    ("Mixed_4b", "mix", (480, (192, 96, 208, 16, 48, 64))),
    ("Mixed_4c", "mix", (512, (160, 112, 224, 24, 64, 64))),
    ("Mixed_4d", "mix", (512, (128, 128, 256, 24, 64, 64))),
    ("Mixed_4e", "mix", (512, (112, 144, 288, 32, 64, 64))),
    ("Mixed_4f", "mix", (528, (256, 160, 320, 32, 128, 128))),
    ("MaxPool3d_5a_2x2", "pool", ((2, 2, 2), (2, 2, 2))),
    ("Mixed_5b", "mix", (832, (256, 160, 320, 32, 128, 128))),
    ("Mixed_5c", "mix", (832, (384, 192, 384, 48, 128, 128))),
]


class InceptionI3d(nn.Module):
    """I3D (RGB stream) with state-dict names of the VideoGPT/TATS `i3d_pretrained_400.pt` file."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.order = [name for name, _, _ in _PLAN]
        for name, kind, args in _PLAN:
            if kind == "conv":
                module = Unit3D(args[0], args[1], args[2], args[3])
            elif kind == "pool":
                module = MaxPoolSame(*args)
            else:
                module = InceptionBlock(*args)
            self.add_module(name, module)
        self.logits = Unit3D(1024, num_classes, bn=False, relu=False, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, T, 224, 224) in [-1, 1] -> (N, num_classes) logits averaged over time."""
        for name in self.order:
            x = getattr(self, name)(x)
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # the Logits avg-pool; dropout is identity in eval
        return self.logits(x).mean(dim=(2, 3, 4))


# ---------------------------------------------------------------------------------------------- loading


class I3DUnavailable(RuntimeError):
    """FVD cannot be computed; str() is the reason reported in metrics/eval.json."""


class I3DFeatures:
    """Loaded I3D network + the clip preparation above, on `device` (CUDA convolutions in true fp32, as for FID).
    Raises I3DUnavailable with the reason."""

    def __init__(self, path: str, *, batch_size: int = 4, device: str = "cpu") -> None:
        if not path:
            raise I3DUnavailable("eval.i3d_weights is empty: FVD needs a user-supplied I3D weights file "
                                 "(i3d_pretrained_400.pt state dict or StyleGAN-V i3d_torchscript.pt); none ships "
                                 "with any package here")
        if not Path(path).is_file():
            raise I3DUnavailable(f"eval.i3d_weights = {path!r}: no such file")
        self.path, self.batch_size, self.device = path, batch_size, device
        self.sha256 = file_sha256(path)
        try:
            if is_torchscript(path):
                self.kind = "torchscript"
                self.net = torch.jit.load(path, map_location=device).eval()
            else:
                self.kind = "state_dict"
                state = torch.load(path, map_location="cpu", weights_only=True)
                if isinstance(state, dict) and "state_dict" in state:
                    state = state["state_dict"]
                self.net = InceptionI3d()
                self.net.load_state_dict(state)
                self.net.to(device).eval()
        except I3DUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - any load failure becomes the reported reason
            raise I3DUnavailable(f"eval.i3d_weights = {path!r}: could not load as an I3D network "
                                 f"({type(exc).__name__}: {str(exc)[:300]})") from exc

    @staticmethod
    def prepare(clips: torch.Tensor) -> torch.Tensor:
        """uint8 (N,3,T,H,W) (or float [-1,1]) -> float (N,3,max(T,16),224,224) in [-1, 1]."""
        x = torch.as_tensor(clips)
        if x.ndim != 5:
            raise ValueError(f"expected clips (N, C, T, H, W), got shape {tuple(x.shape)}")
        x = x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float().clamp(-1, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1, -1)
        n, c, t, h, w = x.shape
        if t < I3D_MIN_FRAMES:
            idx = torch.floor(torch.arange(I3D_MIN_FRAMES, device=x.device) * (t / I3D_MIN_FRAMES)).long()
            x, t = x[:, :, idx], I3D_MIN_FRAMES
        if (h, w) != (I3D_SIZE, I3D_SIZE):
            frames = x.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)
            frames = F.interpolate(frames, size=(I3D_SIZE, I3D_SIZE), mode="bilinear", align_corners=False)
            x = frames.reshape(n, t, c, I3D_SIZE, I3D_SIZE).permute(0, 2, 1, 3, 4)
        return x.contiguous()

    def __call__(self, clips: torch.Tensor) -> np.ndarray:
        out = []
        clips = torch.as_tensor(clips)
        with torch.inference_mode(), full_fp32_convolutions():
            for start in range(0, clips.shape[0], self.batch_size):
                x = self.prepare(clips[start:start + self.batch_size].to(self.device))
                if self.kind == "torchscript":
                    feats = self.net(x, rescale=False, resize=False, return_features=True)
                else:
                    feats = self.net(x)
                out.append(feats.reshape(feats.shape[0], -1).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, NUM_CLASSES))


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
                    cfg) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(real, predicted) uint8 clip batches for eval.num_samples samples: sample i continues held-out clip i mod N_val
    (`held_out()` yields the split in shard order; it is read again when the split is shorter) from its first
    eval.fvd_context_frames frames, with per-sample seeds from (eval.seed + PREDICTION_SEED_OFFSET, i) and the null
    class label (frames are the only conditioning, as in the frame-prediction literature). predicted[:, :, :c] equals
    real[:, :, :c] exactly: the decoder's replacement ends on the real frames, which round-trip through float."""
    from ulcore.data.loaders import to_float, to_uint8
    from ulcore.diffusion.sampling import generate

    e, c = cfg.eval, cfg.eval.fvd_context_frames
    device = next(stage2.base.parameters()).device
    done = 0
    while done < e.num_samples:
        before = done
        for batch in held_out():
            real = torch.as_tensor(batch["x"][: e.num_samples - done])
            if real.shape[0] == 0:
                break
            labels = torch.full((real.shape[0],), cfg.model.num_classes, dtype=torch.int64, device=device)
            predicted = generate(stage1, stage2, labels, seed=e.seed + PREDICTION_SEED_OFFSET, sampler=e.sampler,
                                 base_steps=e.base_steps, decoder_steps=e.decoder_steps, guidance=e.guidance,
                                 guidance_interval=e.guidance_interval, indices=range(done, done + real.shape[0]),
                                 context=to_float(real[:, :, :c].to(device)),
                                 reconstruction_guidance=e.fvd_reconstruction_guidance)
            yield real, to_uint8(predicted).cpu()
            done += real.shape[0]
        if done == before:
            raise ValueError("frame prediction: the held-out split has no clips to take the context from")


def fvd_protocol(cfg, i3d: I3DFeatures | None, *, train_split: str, eval_split: str) -> dict[str, Any]:
    """The FVD protocol fields logged with the number (eval.json, MLflow)."""
    m, e, c = cfg.model, cfg.eval, cfg.eval.fvd_context_frames
    common = {"weights": e.i3d_weights, "sha256": getattr(i3d, "sha256", None), "format": getattr(i3d, "kind", None),
              "min_frames": I3D_MIN_FRAMES, "resolution": I3D_SIZE, "frames": m.frames}
    if c == 0:
        return {**common, "reference": f"{train_split} clips", "context_frames": 0, "generated_frames": m.frames,
                "context_included": False, "conditioning": "none (unconditional clips, labels i mod num_classes)",
                "summary": f"unconditional {m.frames}-frame clips vs {train_split} clips"}
    latent, w = c // m.temporal_downsample, e.fvd_reconstruction_guidance
    seed = e.seed + PREDICTION_SEED_OFFSET
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


__all__ = ["InceptionI3d", "I3DFeatures", "I3DUnavailable", "fvd", "fvd_from_stats", "predicted_clips", "fvd_protocol",
           "I3D_SIZE", "I3D_MIN_FRAMES", "PREDICTION_SEED_OFFSET"]
