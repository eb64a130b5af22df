"""Samplers with the optimal Gaussian denoiser reproduce the data distribution; seeds are per sample."""

import math

import pytest
import torch

from tests.diffusion.gaussian import optimal_velocity
from ulcore.diffusion.sampling import SAMPLERS, PerSampleNoise, guided, logsnr_grid, sample_seeds
from ulcore.diffusion.schedule import CosineLogSNR


@pytest.mark.parametrize("name,steps", [("ddim", 64), ("ancestral", 128)])
def test_sampler_matches_gaussian_marginal_at_logsnr_0(name, steps):
    scale, n, dims, logsnr_0 = 0.6, 2000, 2, 5.0
    sch = CosineLogSNR(-15.0, logsnr_0)
    noise = PerSampleNoise((dims,), sample_seeds(0, range(n)))
    z = SAMPLERS[name](optimal_velocity(scale), noise(-1).double(), logsnr_grid(sch, steps).double(), lambda i: noise(i).double())
    a2 = 1 / (1 + math.exp(-logsnr_0))
    target_var = a2 * scale**2 + (1 - a2)  # Var(z_0) = α₀² s² + σ₀²
    assert abs(z.mean().item()) < 4 * math.sqrt(target_var / (n * dims))
    assert z.var().item() == pytest.approx(target_var, rel=0.08)


def test_samples_do_not_depend_on_batch_composition():
    sch = CosineLogSNR(-15.0, 5.0)
    net = optimal_velocity(0.8)
    grid = logsnr_grid(sch, 16)

    def run(indices):
        noise = PerSampleNoise((3,), sample_seeds(7, indices))
        return SAMPLERS["ancestral"](net, noise(-1), grid, noise)

    full = run(range(6))
    part = run([4, 5])
    torch.testing.assert_close(full[4:], part)


def test_guidance_scale_one_is_conditional_and_interval_is_respected():
    def net(z, lam, labels):
        return z * 0 + labels.float().reshape(-1, 1)

    labels = torch.tensor([2, 3])
    z, lam = torch.zeros(2, 1), torch.full((2,), 0.0)
    assert torch.equal(guided(net, labels, 9, 1.0)(z, lam), net(z, lam, labels))
    g = guided(net, labels, 9, 3.0)(z, lam)  # 9 + 3 (c − 9)
    torch.testing.assert_close(g, torch.tensor([[9 + 3 * (2 - 9.0)], [9 + 3 * (3 - 9.0)]]))
    outside = guided(net, labels, 9, 3.0, interval=(1.0, 5.0))(z, lam)
    assert torch.equal(outside, net(z, lam, labels))


def test_generate_from_prior_decodes_the_priors_own_samples_per_sample_seeded():
    """Prior samples (gfid_prior): the decoder is conditioned on exactly sample_prior's z_0, and sample i depends on
    its own seed only, however the N samples are batched."""
    from types import SimpleNamespace

    from ulcore.config import load_config
    from ulcore.diffusion.sampling import generate_from_prior, sample_prior

    seen = []

    def decoder(x, lam, z0):
        seen.append(z0)
        return optimal_velocity(0.5)(x, lam).float() + z0.flatten(1).mean(1).reshape(-1, 1, 1, 1)  # uses its z_0

    cfg = load_config(None, ["data.resolution=8"])
    stage1 = SimpleNamespace(prior=lambda z, lam: optimal_velocity(0.8)(z, lam).float(), decoder=decoder, config=cfg)
    full = generate_from_prior(stage1, 6, seed=3, prior_steps=8, decoder_steps=4, sampler="ancestral")
    assert full.shape == (6, 3, 8, 8) and full.abs().max() <= 1.0
    torch.testing.assert_close(seen[0], sample_prior(stage1, 6, seed=3, steps=8, sampler="ancestral"))
    part = generate_from_prior(stage1, 2, seed=3, prior_steps=8, decoder_steps=4, sampler="ancestral", indices=[4, 5])
    torch.testing.assert_close(full[4:], part)
