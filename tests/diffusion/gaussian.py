"""Gaussian data N(0, s² I): the analytically optimal denoiser and exact densities (closed-form test fixtures)."""

import math

import torch

from ulcore.diffusion.losses import v_from_x
from ulcore.diffusion.schedule import alpha_sigma


def optimal_velocity(scale: float):
    """v̂ of the MMSE denoiser x̂(z_t) = α s² z_t / (α² s² + σ²) for x ~ N(0, s² I)."""

    def net(z_t, lam):
        a, s = alpha_sigma(lam.double())
        a, s = a.reshape(-1, *[1] * (z_t.ndim - 1)), s.reshape(-1, *[1] * (z_t.ndim - 1))
        x_hat = a * scale**2 * z_t / (a**2 * scale**2 + s**2)
        return v_from_x(z_t, x_hat, a.flatten(), s.flatten())

    return net


def gaussian_nll(x: torch.Tensor, scale: float) -> torch.Tensor:
    """−log N(x; 0, s² I) per example."""
    d = x[0].numel()
    return 0.5 * (x.flatten(1) ** 2).sum(1) / scale**2 + 0.5 * d * math.log(2 * math.pi * scale**2)


def posterior_nll(x: torch.Tensor, z0: torch.Tensor, scale: float, logsnr_0: float) -> torch.Tensor:
    """−log q(x | z_0): the exact Gaussian posterior of the data given z_0 = α₀ x + σ₀ ε."""
    a, s = alpha_sigma(torch.tensor(logsnr_0, dtype=torch.float64))
    var = scale**2 * s**2 / (a**2 * scale**2 + s**2)
    mean = a * scale**2 * z0 / (a**2 * scale**2 + s**2)
    d = x[0].numel()
    return 0.5 * ((x - mean).flatten(1) ** 2).sum(1) / var + 0.5 * d * torch.log(2 * math.pi * var)
