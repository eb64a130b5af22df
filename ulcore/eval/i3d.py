"""The FVD network: I3D (Kinetics-400) features of whole clips, from a weights file the user supplies.

Two files are accepted (`eval.i3d_weights`), detected by format:
- `i3d_pretrained_400.pt` (VideoGPT / TATS): a state dict for `i3d_net.InceptionI3d`. Features = the 400 logits
  averaged over time.
- StyleGAN-V's `i3d_torchscript.pt`: called as `net(x, rescale=False, resize=False, return_features=True)`.
Both get clips as float (N, 3, T, 224, 224) in [-1, 1]: frames bilinearly resized to 224² (align_corners=False),
clips shorter than 16 frames repeated nearest-in-time to 16 (the network's temporal receptive field; recorded
in the protocol). No file, or a file that fails to load: `I3DUnavailable` with the reason - never a number from a
stand-in network.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ulcore.eval.i3d_net import NUM_CLASSES, InceptionI3d
from ulcore.eval.inception import file_sha256, full_fp32_convolutions, is_torchscript

I3D_SIZE = 224
I3D_MIN_FRAMES = 16


class I3DUnavailable(RuntimeError):
    """FVD cannot be computed; str() is the reason reported in metrics/eval.json."""


class I3DFeatures:
    """Loaded I3D network + the clip preparation of the module docstring, on `device` (CUDA convolutions in true
    fp32, as for FID). Raises I3DUnavailable with the reason."""

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


__all__ = ["I3DFeatures", "I3DUnavailable", "I3D_SIZE", "I3D_MIN_FRAMES"]
