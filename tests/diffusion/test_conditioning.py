"""Replacement conditioning and reconstruction guidance against closed forms on correlated Gaussian 'clips'.

Data x = (a, b): two frames of one value each, x ~ N(0, [[1, ρ], [ρ, 1]]); frame a is known. The optimal denoiser
is linear, x̂ = M_t z_t with M_t = α_t Σ (α_t² Σ + σ_t² I)⁻¹, so a DDIM chain with replacement (and reconstruction
guidance of weight w) is a linear-Gaussian recursion in z^b whose mean and variance have a closed form.
"""

import math

import pytest
import torch

from ulcore.diffusion.losses import v_from_x
from ulcore.diffusion.sampling import (SAMPLERS, PerSampleNoise, Replacement, logsnr_grid, reconstruction_guided,
                                       sample_seeds)
from ulcore.diffusion.schedule import CosineLogSNR, alpha_sigma

LOGSNR_0 = 5.0


def _denoiser_matrix(rho: float, lam: float) -> torch.Tensor:
    a, s = alpha_sigma(torch.tensor(lam, dtype=torch.float64))
    cov = torch.tensor([[1.0, rho], [rho, 1.0]], dtype=torch.float64)
    return a * cov @ torch.linalg.inv(a**2 * cov + s**2 * torch.eye(2, dtype=torch.float64))


def _optimal_velocity(rho: float):
    """v̂ of x̂ = M_t z_t on states (B, 1, 2): the frame axis is dim 2, as for clips (B, C, T, H, W)."""

    def net(z, lam):
        a, s = alpha_sigma(lam.double())
        x_hat = torch.einsum("ij,bcj->bci", _denoiser_matrix(rho, float(lam[0])), z.double())
        return v_from_x(z.double(), x_hat, a, s)

    return net


def _replacement_ddim_closed_form(rho: float, w: float, known: float, grid: torch.Tensor) -> tuple[float, float]:
    """Mean and variance of z^b at the end of DDIM with replacement (+ guidance w), z^b_1 ~ N(0, 1).
    Per step t -> s: z^a_t = α_t a + σ_t ε_t (fresh ε_t), x̃^b = p z^a_t + q z^b_t + r a with p = M_ba − w α_t M_ab M_aa,
    q = M_bb − w α_t M_ab², r = w α_t M_ab (x̃^b = x̂^b + w α_t M_ab (a − x̂^a)); z^b_s = K x̃^b + L z^b_t with
    K = α_s − σ_s α_t / σ_t, L = σ_s / σ_t (DDIM: z_s = α_s x̃ + σ_s ε̂, ε̂ = (z_t − α_t x̃) / σ_t)."""
    mean, var = 0.0, 1.0
    for lam_t, lam_s in zip(grid[:-1].tolist(), grid[1:].tolist()):
        a_t, s_t = (float(v) for v in alpha_sigma(torch.tensor(lam_t, dtype=torch.float64)))
        a_s, s_s = (float(v) for v in alpha_sigma(torch.tensor(lam_s, dtype=torch.float64)))
        m = _denoiser_matrix(rho, lam_t).tolist()
        p, q, r = m[1][0] - w * a_t * m[0][1] * m[0][0], m[1][1] - w * a_t * m[0][1] ** 2, w * a_t * m[0][1]
        k, el = a_s - s_s * a_t / s_t, s_s / s_t
        mean = (k * q + el) * mean + k * (p * a_t + r) * known
        var = (k * q + el) ** 2 * var + (k * p * s_t) ** 2
    return mean, var


def _batch_noise(shape: tuple[int, ...], seed: int):
    """One generator for the whole batch: these tests measure distributions, not batch independence, and
    thousands of per-sample generators would dominate their run time."""
    gen = torch.Generator().manual_seed(seed)
    return lambda _step=0: torch.randn(shape, generator=gen, dtype=torch.float64)


def _run(model, w: float, known: float, n: int, grid: torch.Tensor, sampler: str = "ddim") -> torch.Tensor:
    noise = _batch_noise((n, 1, 2), 0)
    x_a = torch.full((n, 1, 1), known, dtype=torch.float64)
    if w:
        model = reconstruction_guided(model, x_a, w)
    return SAMPLERS[sampler](model, noise(), grid, noise, Replacement(x_a, _batch_noise((n, 1, 1), 1)))


@pytest.mark.parametrize("rho,w", [(0.0, 0.0), (0.9, 0.0), (0.9, 2.0)])
def test_replacement_ddim_matches_its_closed_form_and_guidance_moves_towards_the_true_conditional(rho, w):
    n, known = 4000, 1.5
    grid = logsnr_grid(CosineLogSNR(-15.0, LOGSNR_0), 48).double()
    z = _run(_optimal_velocity(rho), w, known, n, grid)
    a0, s0 = (float(v) for v in alpha_sigma(torch.tensor(LOGSNR_0, dtype=torch.float64)))
    # known frame: the forward process at λ(0), z^a_0 = α₀ a + σ₀ ε (the base model's chain ends on z_0, not z_clean)
    assert z[:, 0, 0].mean().item() == pytest.approx(a0 * known, abs=4 * s0 / math.sqrt(n))
    assert z[:, 0, 0].std().item() == pytest.approx(s0, rel=4 / math.sqrt(2 * n))
    mean, var = _replacement_ddim_closed_form(rho, w, known, grid)
    b = z[:, 0, 1]
    assert b.mean().item() == pytest.approx(mean, abs=4 * math.sqrt(var / n))
    assert b.var().item() == pytest.approx(var, rel=4 * math.sqrt(2 / n))
    true_mean, true_var = a0 * rho * known, a0**2 * (1 - rho**2) + s0**2  # z^b_0 = α₀ b + σ₀ ε, b | a ~ N(ρa, 1 − ρ²)
    if rho == 0.0:  # independent frames: replacement is exact (up to DDIM's discretisation)
        assert mean == pytest.approx(true_mean, abs=1e-9) and var == pytest.approx(true_var, rel=0.05)
    elif w == 0.0:  # correlated frames: plain replacement pulls the prediction towards the unconditional mean
        assert 0.3 * true_mean < mean < 0.6 * true_mean
    else:  # reconstruction guidance removes most of that bias
        replacement_mean, _ = _replacement_ddim_closed_form(rho, 0.0, known, grid)
        assert abs(b.mean().item() - true_mean) < 0.5 * abs(replacement_mean - true_mean)


@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
def test_every_state_the_model_sees_has_its_known_frame_on_the_forward_process(sampler):
    n, known = 2000, -0.7
    grid = logsnr_grid(CosineLogSNR(-15.0, LOGSNR_0), 6).double()
    seen = []
    denoiser = _optimal_velocity(0.5)

    def spy(z, lam):
        seen.append((float(lam[0]), z[:, 0, 0].clone()))
        return denoiser(z, lam)

    _run(spy, 0.0, known, n, grid, sampler)
    assert [lam for lam, _ in seen] == pytest.approx(grid[:-1].tolist())
    for lam, z_a in seen:  # z^a_λ ~ N(α_λ a, σ_λ²): q(z_λ | x^a), fresh per step
        a, s = (float(v) for v in alpha_sigma(torch.tensor(lam, dtype=torch.float64)))
        assert z_a.mean().item() == pytest.approx(a * known, abs=4 * s / math.sqrt(n))
        assert z_a.std().item() == pytest.approx(s, rel=4 / math.sqrt(2 * n))
    assert torch.corrcoef(torch.stack([seen[1][1], seen[2][1]]))[0, 1].abs() < 4 / math.sqrt(n)


def test_clean_sets_the_known_frames_and_leaves_the_rest():
    known = torch.randn(3, 2, 1, 4)
    replace = Replacement(known, PerSampleNoise((2, 1, 4), sample_seeds(0, range(3))))
    x = torch.randn(3, 2, 5, 4)
    out = replace.clean(x)
    assert torch.equal(out[:, :, :1], known) and torch.equal(out[:, :, 1:], x[:, :, 1:])
