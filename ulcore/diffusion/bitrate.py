"""Bitrate estimators: the unweighted diffusion ELBO of the latents down to λ(0), L_z (docs/method.md (M7)-(M8)),
in bits per pixel (M9). Two estimates of the same latents: the stage-1 prior's (UL §4.4) and the stage-2 base
model's, usually tighter (UL Table 5). Time and noise draws come from one CPU generator seeded by `seed`, so the
number does not depend on the device the nets run on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ulcore.diffusion.losses import VelocityFn, bits_per_pixel, diffusion_elbo
from ulcore.diffusion.schedule import latent_schedule, stratified_times


@torch.no_grad()
def elbo_bits_per_pixel(net: VelocityFn, z_clean: Tensor, config, *, seed: int, draws: int = 4) -> Tensor:
    """Per-example unweighted diffusion ELBO down to λ(0), in bits per pixel, averaged over `draws`."""
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same draws whichever device the nets run on
    total = torch.zeros(z_clean.shape[0])
    for _ in range(draws):
        t = stratified_times(z_clean.shape[0], gen).to(z_clean.device)
        eps = torch.randn(z_clean.shape, generator=gen).to(z_clean.device)
        total += diffusion_elbo(net, z_clean, t, eps, latent_schedule(config.model)).total.cpu()
    pixels = config.data.resolution**2 * config.model.frames
    return bits_per_pixel(total / draws, pixels)


def prior_bits_per_pixel(stage1, x: Tensor, *, seed: int, draws: int = 4) -> Tensor:
    """Stage-1 bitrate bound L_z / (ln 2 · H·W) on images x (UL §4.4)."""
    return elbo_bits_per_pixel(stage1.prior, stage1.encoder(x).float(), stage1.config, seed=seed, draws=draws)


def base_bits_per_pixel(stage1, stage2, x: Tensor, labels: Tensor, *, seed: int, draws: int = 4) -> Tensor:
    """The base model's ELBO on the same latents: the second, usually tighter, bitrate estimate (UL Table 5)."""
    net = lambda z, lam: stage2.base(z, lam, labels)  # noqa: E731 - a closure over the labels
    return elbo_bits_per_pixel(net, stage1.encoder(x).float(), stage1.config, seed=seed, draws=draws)
