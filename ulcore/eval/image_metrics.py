"""Reconstruction metrics on the pixel scale people compare: PSNR and SSIM on [0, 255].

Both take uint8 images, or floats in [-1, 1] that are first clipped and quantised to uint8 (what a saved PNG
holds); video clips (N,C,T,H,W) count each frame as one image. Both return one value per image; average once,
at the caller.
- PSNR = 10 log10(255² / MSE) per image, MSE over all pixels and channels of that image; an exact match is
  capped at 100 dB (MSE floored at 255² · 1e-10) so means stay finite.
- SSIM: torchmetrics' `structural_similarity_index_measure` with its defaults (Gaussian window 11x11, σ = 1.5,
  K1 = 0.01, K2 = 0.03), data_range 255, per image. skimage (7x7 uniform) and piq (downsampling) give other
  numbers on the same pair; compare only SSIMs computed this way.
- chroma: per image, the mean over pixels of the standard deviation across the colour channels on [0, 255]
  (population std). 0 for a greyscale image stored as RGB, as the embedded Fashion-MNIST is; generated or
  reconstructed images of greyscale data above it carry coloured noise the data never had.
"""

from __future__ import annotations

import numpy as np
import torch

PSNR_CAP_DB = 100.0


def to_255(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8, or float in [-1, 1] (clipped, rounded), -> float32 on [0, 255]; clips flattened to frames."""
    t = torch.as_tensor(x)
    if t.dtype != torch.uint8:
        if not t.is_floating_point():
            raise ValueError(f"expected uint8 pixels or floats in [-1, 1], got {t.dtype}")
        t = ((t.float() + 1.0) * 127.5).round().clamp(0, 255)
    t = t.float()
    if t.ndim == 5:  # (N, C, T, H, W) -> (N*T, C, H, W)
        t = t.permute(0, 2, 1, 3, 4).reshape(-1, t.shape[1], t.shape[3], t.shape[4])
    if t.ndim == 3:
        t = t.unsqueeze(1)
    if t.ndim != 4:
        raise ValueError(f"expected images (N,C,H,W) or clips (N,C,T,H,W), got shape {tuple(t.shape)}")
    return t


def psnr(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Per-image PSNR in dB on [0, 255] after clipping: 10 log10(255² / MSE_i)."""
    a, b = to_255(x), to_255(y)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(dim=1)
    mse = mse.clamp(min=255.0**2 * 10 ** (-PSNR_CAP_DB / 10))
    return (10.0 * torch.log10(255.0**2 / mse)).float()


def ssim(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Per-image SSIM (torchmetrics, Gaussian 11x11, σ 1.5, data_range 255)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = to_255(x), to_255(y)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    values = structural_similarity_index_measure(a, b, data_range=255.0, reduction="none")
    return torch.as_tensor(values).float().reshape(a.shape[0])


def chroma(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Per-image mean over pixels of the std across channels on [0, 255]: 0 for grey pixels."""
    a = to_255(x).double()
    return a.std(dim=1, unbiased=False).flatten(1).mean(dim=1).float()


__all__ = ["psnr", "ssim", "chroma", "to_255", "PSNR_CAP_DB"]
