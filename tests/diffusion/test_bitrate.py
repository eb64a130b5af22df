"""The bitrate estimators against the closed form for Gaussian latents and their optimal denoiser."""

import math
from types import SimpleNamespace

import torch

from tests.diffusion.gaussian import optimal_velocity
from ulcore.diffusion.bitrate import elbo_bits_per_pixel


def _config(resolution: int, logsnr_min: float = -15.0, logsnr_0: float = 5.0):
    return SimpleNamespace(model=SimpleNamespace(logsnr_min=logsnr_min, logsnr_0=logsnr_0, frames=1),
                           data=SimpleNamespace(resolution=resolution))


def test_gaussian_latents_cost_the_information_of_the_encoding_channel():
    """z_clean ~ N(0, s² I), optimal denoiser: by I-MMSE the diffusion term from λ_min to λ(0) is I(λ(0)) − I(λ_min)
    with I(λ) = d/2 log(1 + s² e^λ), and E KL₁ = I(λ_min) + d/2 (v − 1 − log v), v = α₁² s² + σ₁² (docs/method.md
    (M7)-(M9)); so E L_z = d/2 log(1 + s² e^λ(0)) + d/2 (v − 1 − log v), over ln 2 · H·W bits per pixel."""
    torch.manual_seed(0)
    scale, resolution, cfg = 1.5, 4, _config(4)
    z = torch.randn(4096, 4, 2, 2) * scale  # d = 16 latent dimensions per example, 4² pixels
    bpp = elbo_bits_per_pixel(optimal_velocity(scale), z, cfg, seed=3)
    d = z[0].numel()
    a1 = torch.sigmoid(torch.tensor(cfg.model.logsnr_min, dtype=torch.float64))
    v = float(a1 * scale**2 + (1 - a1))
    nats = d / 2 * math.log1p(scale**2 * math.exp(cfg.model.logsnr_0)) + d / 2 * (v - 1 - math.log(v))
    exact = nats / (math.log(2) * resolution**2)
    estimate, stderr = bpp.double().mean().item(), bpp.double().std().item() / math.sqrt(bpp.shape[0])
    assert abs(estimate - exact) < 4 * stderr + 1e-3, (estimate, exact, stderr)
    torch.testing.assert_close(elbo_bits_per_pixel(optimal_velocity(scale), z, cfg, seed=3), bpp)  # seeded draws
