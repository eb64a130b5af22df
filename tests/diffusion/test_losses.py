"""Losses against closed forms: the ELBO of Gaussian data equals its exact NLL; KL₁; units and scaling."""

import math

import pytest
import torch

from tests.diffusion.gaussian import gaussian_nll, optimal_velocity, posterior_nll
from ulcore.diffusion.losses import (
    bits_per_pixel,
    bits_per_subpixel,
    diffusion_elbo,
    encode_noise,
    kl_prior_1,
    sigmoid_weighted_loss,
)
from ulcore.diffusion.schedule import CosineLogSNR, stratified_times


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_gaussian_elbo_equals_exact_nll(scale):
    """Diffusion term + KL₁ + E[−log q(x | z₀)] = −log p(x) when the denoiser is optimal (VDM; UL Eq. 1-3)."""
    torch.manual_seed(0)
    logsnr_0, dims, draws = 5.0, 3, 40_000
    sch = CosineLogSNR(-15.0, logsnr_0)
    x = torch.randn(4, dims, dtype=torch.float64) * scale
    xs = x.repeat_interleave(draws, 0)
    t = torch.rand(xs.shape[0], dtype=torch.float64)
    eps = torch.randn_like(xs)
    terms = diffusion_elbo(optimal_velocity(scale), xs, t, eps, sch)
    z0 = encode_noise(xs, logsnr_0, torch.randn_like(xs)).double()
    recon = posterior_nll(xs, z0, scale, logsnr_0)
    elbo = (terms.diffusion.double() + terms.kl_1.double() + recon).reshape(4, draws)
    estimate, stderr = elbo.mean(1), elbo.std(1) / math.sqrt(draws)
    exact = gaussian_nll(x, scale)
    assert torch.all((estimate - exact).abs() < 4 * stderr + 1e-3), (estimate, exact, stderr)


def test_suboptimal_denoiser_gives_a_looser_bound():
    torch.manual_seed(1)
    sch = CosineLogSNR(-15.0, 5.0)
    z = torch.randn(20_000, 3, dtype=torch.float64)
    t, eps = torch.rand(z.shape[0], dtype=torch.float64), torch.randn_like(z)
    good = diffusion_elbo(optimal_velocity(1.0), z, t, eps, sch).total.mean()
    bad = diffusion_elbo(optimal_velocity(3.0), z, t, eps, sch).total.mean()
    assert bad > good + 0.05


def test_kl_1_matches_torch_distributions():
    z = torch.randn(5, 2, 3, 3) * 2
    lam1 = -7.0
    a, s = math.sqrt(1 / (1 + math.exp(-lam1))), math.sqrt(1 / (1 + math.exp(lam1)))
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(a * z, torch.full_like(z, s)), torch.distributions.Normal(0.0, 1.0)
    ).flatten(1).sum(1)
    torch.testing.assert_close(kl_prior_1(z, lam1), ref, rtol=1e-5, atol=1e-6)


def test_doubling_latent_channels_doubles_the_prior_loss():
    """Nothing is mean-reduced per term: the per-example ELBO sums over every latent dimension."""
    sch = CosineLogSNR(-15.0, 5.0)
    net = optimal_velocity(1.0)
    z = torch.randn(8, 4, 2, 2, dtype=torch.float64)
    t, eps = torch.rand(8, dtype=torch.float64), torch.randn_like(z)
    one = diffusion_elbo(net, z, t, eps, sch).total
    two = diffusion_elbo(net, torch.cat([z, z], 1), t, torch.cat([eps, eps], 1), sch).total
    torch.testing.assert_close(two, 2 * one)


def test_decoder_loss_scales_exactly_with_the_loss_factor_and_has_sigmoid_weight():
    sch = CosineLogSNR(-15.0, 15.0)
    net = optimal_velocity(0.7)
    x = torch.randn(16, 3, 4, 4, dtype=torch.float64)
    t, eps = stratified_times(16, torch.Generator().manual_seed(0)).double(), torch.randn_like(x)
    base = sigmoid_weighted_loss(net, x, t, eps, sch, bias=-2.0, factor=1.0)
    torch.testing.assert_close(sigmoid_weighted_loss(net, x, t, eps, sch, bias=-2.0, factor=1.7), 1.7 * base)
    # the weighting is sigmoid(b − λ) times the unweighted ELBO integrand (ε-form, UL Fig. 3)
    unweighted = diffusion_elbo(net, x, t, eps, sch).diffusion
    lam = sch.logsnr(t)
    torch.testing.assert_close(base, unweighted * torch.sigmoid(-2.0 - lam))


def test_bits_per_pixel_units():
    nats = torch.tensor([math.log(2) * 32 * 32])
    assert bits_per_pixel(nats, 32 * 32).item() == pytest.approx(1.0)


def test_bits_per_subpixel_divides_by_the_channels_too():
    # 1 bit per sub-pixel of a 32x32 RGB image: 3072 bits in all = 3 bits per pixel
    nats = torch.tensor([math.log(2) * 32 * 32 * 3])
    bpp = bits_per_pixel(nats, 32 * 32)
    assert bpp.item() == pytest.approx(3.0) and bits_per_subpixel(bpp, 3).item() == pytest.approx(1.0)
