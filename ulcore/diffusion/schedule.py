"""Log-SNR noise schedules for variance-preserving diffusion (VDM, Kingma et al. 2021; simple diffusion).

Conventions (docs/method.md §1, (M1)): x_t = α_t x + σ_t ε, α² + σ² = 1, λ = log(α²/σ²) decreasing in t ∈ [0, 1],
so α² = sigmoid(λ) and σ² = sigmoid(−λ). Only the endpoints λ(0), λ(1) enter the continuous ELBO; the shape
between them only changes the Monte-Carlo variance (VDM §5.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ulcore.config import ModelConfig


def alpha_sigma(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """α = sqrt(sigmoid(λ)), σ = sqrt(sigmoid(−λ)) — exact and stable for large |λ|."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


@dataclass(frozen=True)
class CosineLogSNR:
    """Cosine schedule λ(t) = shift − 2 log tan(u(t)), truncated so λ(0) = logsnr_max and λ(1) = logsnr_min.

    u(t) = u_0 + t (u_1 − u_0) with u_i = atan(exp(−(λ_i − shift)/2)): an affine map of t onto the part of
    the cosine schedule between the two endpoints, so both endpoints are hit exactly (simple diffusion §3.1).
    """

    logsnr_min: float
    logsnr_max: float
    shift: float = 0.0

    def __post_init__(self) -> None:
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError(f"schedule needs logsnr_min < logsnr_max, got [{self.logsnr_min}, {self.logsnr_max}]")

    @property
    def _u0(self) -> float:
        return math.atan(math.exp(-0.5 * (self.logsnr_max - self.shift)))

    @property
    def _u1(self) -> float:
        return math.atan(math.exp(-0.5 * (self.logsnr_min - self.shift)))

    def logsnr(self, t: Tensor) -> Tensor:
        """λ(t) = shift − 2 log tan(u(t))."""
        u = self._u0 + t * (self._u1 - self._u0)
        return self.shift - 2.0 * torch.log(torch.tan(u))

    def t_of(self, logsnr: Tensor) -> Tensor:
        """Inverse schedule t(λ) = (atan(exp(−(λ − shift)/2)) − u_0) / (u_1 − u_0)."""
        u = torch.atan(torch.exp(-0.5 * (logsnr - self.shift)))
        return (u - self._u0) / (self._u1 - self._u0)

    def dlogsnr_dt(self, t: Tensor) -> Tensor:
        """dλ/dt = −2 (u_1 − u_0) / (sin u cos u) = −4 (u_1 − u_0) / sin 2u  (< 0)."""
        u = self._u0 + t * (self._u1 - self._u0)
        return -4.0 * (self._u1 - self._u0) / torch.sin(2.0 * u)


def latent_schedule(m: ModelConfig) -> CosineLogSNR:
    """Prior and base-model schedule: from λ_min up to the fixed encoding level λ(0) (UL §3.1, §3.3)."""
    return CosineLogSNR(m.logsnr_min, m.logsnr_0)


def decoder_schedule(m: ModelConfig) -> CosineLogSNR:
    """Pixel-space decoder schedule λ_x(t), with the simple-diffusion resolution shift."""
    return CosineLogSNR(m.decoder_logsnr_min, m.decoder_logsnr_max, m.decoder_shift)


def stratified_times(batch: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> Tensor:
    """t_i = (i + u)/B mod 1 with one shared u ~ U(0,1): low-variance ELBO estimates (VDM App. I.1).

    The order is shuffled so the strata are not tied to batch position (ranks see different strata).
    """
    u = torch.rand((), generator=generator, device=device)
    t = torch.remainder(u + torch.arange(batch, device=device) / batch, 1.0)
    return t[torch.randperm(batch, generator=generator, device=device)]
