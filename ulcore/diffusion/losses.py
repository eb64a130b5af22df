"""The three UL objectives as pure functions returning per-example terms in nats (docs/method.md §4-§8).

All diffusion nets predict v (docs/method.md §10, D3); losses are written on the ε-MSE, using
‖ε − ε̂‖² = e^λ ‖x − x̂‖² = α² ‖v − v̂‖².  ‖·‖² sums over every dimension of one example: reducing each term
by its own mean would rescale the loss factor by D_x / D_z (docs/method.md §7). Reduction over the batch happens
once, at the caller.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ulcore.diffusion.schedule import CosineLogSNR, alpha_sigma

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (z_t, λ) -> v̂


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast against an example batch."""
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


def sum_per_example(v: Tensor) -> Tensor:
    """‖·‖²-style reduction: sum over every dimension but the batch."""
    return v.flatten(1).sum(1)


def eps_from_v(z_t: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """ε̂ = σ z_t + α v̂."""
    return _bcast(sigma, z_t) * z_t + _bcast(alpha, z_t) * v


def x_from_v(z_t: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x̂ = α z_t − σ v̂."""
    return _bcast(alpha, z_t) * z_t - _bcast(sigma, z_t) * v


def v_from_x(z_t: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """v = (α z_t − x) / σ: the velocity whose x̂ is x (used to wrap x-predicting denoisers)."""
    return (_bcast(alpha, z_t) * z_t - x) / _bcast(sigma, z_t)


def diffuse(x: Tensor, logsnr: Tensor, eps: Tensor) -> Tensor:
    """Forward process z_λ = α x + σ ε."""
    alpha, sigma = alpha_sigma(logsnr)
    return _bcast(alpha, x) * x + _bcast(sigma, x) * eps


def encode_noise(z_clean: Tensor, logsnr_0: float, eps_z: Tensor) -> Tensor:
    """z_0 = α_0 z_clean + σ_0 ε_z at the fixed λ(0) (UL §3.1)."""
    lam = torch.full((z_clean.shape[0],), float(logsnr_0), device=z_clean.device)
    return diffuse(z_clean, lam, eps_z)


def kl_prior_1(z_clean: Tensor, logsnr_1: float) -> Tensor:
    """KL(N(α_1 z, σ_1² I) ‖ N(0, I)) = ½ Σ_i (α_1² z_i² + σ_1² − 1 − log σ_1²), per example (docs/method.md (M8))."""
    lam = torch.tensor(float(logsnr_1), dtype=torch.float64)
    a2, s2 = torch.sigmoid(lam).item(), torch.sigmoid(-lam).item()
    const = s2 - 1.0 - math.log(s2)
    return 0.5 * sum_per_example(a2 * z_clean.float() ** 2 + const)


@dataclass(frozen=True)
class PriorTerms:
    """Per-example prior ELBO terms in nats: L_z = diffusion + kl_1 (UL Eq. 3 with w = 1)."""

    diffusion: Tensor
    kl_1: Tensor

    @property
    def total(self) -> Tensor:
        return self.diffusion + self.kl_1


def diffusion_elbo(net: VelocityFn, z_clean: Tensor, t: Tensor, eps: Tensor, schedule: CosineLogSNR) -> PriorTerms:
    """Unweighted continuous diffusion ELBO down to λ(0):
    E_t[½ (−dλ/dt) ‖ε − ε̂(z_t, t)‖²] + KL₁ (UL Eq. 3; the prior's KL term and the base model's bitrate).

    The regression target is z_clean (not z_0); there is no reconstruction term because the prior only models
    down to z_0, whose entropy the forward process already contains (docs/method.md §4).
    """
    lam = schedule.logsnr(t)
    alpha, sigma = alpha_sigma(lam)
    z_t = _bcast(alpha, z_clean) * z_clean + _bcast(sigma, z_clean) * eps
    eps_hat = eps_from_v(z_t, net(z_t, lam), alpha, sigma)
    weight = -0.5 * schedule.dlogsnr_dt(t)
    diffusion = weight * sum_per_example((eps - eps_hat).float() ** 2)
    return PriorTerms(diffusion=diffusion, kl_1=kl_prior_1(z_clean, schedule.logsnr_min))


def sigmoid_weighted_loss(
    net: VelocityFn, x: Tensor, t: Tensor, eps: Tensor, schedule: CosineLogSNR, bias: float, factor: float = 1.0
) -> Tensor:
    """E_t[½ (−dλ/dt) · factor · sigmoid(b − λ) · ‖ε − ε̂(x_t, t)‖²], per example in nats.

    The decoder loss L_x (factor = c_lf, b = decoder bias; UL Fig. 3 ε-form, the consistent sign) and the stage-2
    base-model loss (factor = 1, b = b₂; UL §3.3) are both this sigmoid-weighted ELBO.
    """
    lam = schedule.logsnr(t)
    alpha, sigma = alpha_sigma(lam)
    x_t = _bcast(alpha, x) * x + _bcast(sigma, x) * eps
    eps_hat = eps_from_v(x_t, net(x_t, lam), alpha, sigma)
    weight = -0.5 * schedule.dlogsnr_dt(t) * factor * torch.sigmoid(bias - lam)
    return weight * sum_per_example((eps - eps_hat).float() ** 2)


def bits_per_pixel(nats: Tensor, pixels: int) -> Tensor:
    """Bitrate bound R = L / ln 2 per example, divided by pixels = H·W (·T for video); not per sub-pixel."""
    return nats / (math.log(2.0) * pixels)


def bits_per_subpixel(bits_per_pixel: Tensor | float, channels: int) -> Tensor | float:
    """The same bound per sub-pixel, ÷ H·W·C (·T): the VDM convention. UL's tables appear to use per pixel."""
    return bits_per_pixel / channels
