"""Schedule closed forms: endpoints, λ ↔ t round trip, dλ/dt against finite differences, α₀/σ₀ at λ = 5."""

import math

import pytest
import torch

from ulcore.config import load_config
from ulcore.diffusion.schedule import CosineLogSNR, alpha_sigma, decoder_schedule, latent_schedule, stratified_times

SCHEDULES = [CosineLogSNR(-15.0, 5.0), CosineLogSNR(-15.0, 15.0, shift=-4.16), CosineLogSNR(-10.0, 10.0, shift=1.0)]


@pytest.mark.parametrize("sch", SCHEDULES)
def test_endpoints_are_exact(sch):
    lam = sch.logsnr(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert lam[0].item() == pytest.approx(sch.logsnr_max, abs=1e-9)
    assert lam[1].item() == pytest.approx(sch.logsnr_min, abs=1e-9)


@pytest.mark.parametrize("sch", SCHEDULES)
def test_round_trip_and_monotone(sch):
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    lam = sch.logsnr(t)
    assert torch.all(lam[1:] < lam[:-1])
    torch.testing.assert_close(sch.t_of(lam), t, atol=1e-9, rtol=0)


@pytest.mark.parametrize("sch", SCHEDULES)
def test_derivative_matches_finite_differences(sch):
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    h = 1e-6
    fd = (sch.logsnr(t + h) - sch.logsnr(t - h)) / (2 * h)
    torch.testing.assert_close(sch.dlogsnr_dt(t), fd, rtol=1e-6, atol=1e-6)
    assert torch.all(sch.dlogsnr_dt(t) < 0)


def test_alpha_sigma_at_logsnr_5():
    a, s = alpha_sigma(torch.tensor(5.0, dtype=torch.float64))
    assert a.item() == pytest.approx(0.99665, abs=1e-5)
    assert s.item() == pytest.approx(0.08181, abs=1e-5)
    assert (a**2 + s**2).item() == pytest.approx(1.0, abs=1e-12)
    assert math.log(a.item() ** 2 / s.item() ** 2) == pytest.approx(5.0, abs=1e-9)


def test_schedules_from_config_use_logsnr_0():
    cfg = load_config(overrides=["model.logsnr_0=4.0"])
    assert latent_schedule(cfg.model).logsnr_max == 4.0
    assert decoder_schedule(cfg.model).logsnr_max == cfg.model.decoder_logsnr_max


def test_stratified_times_cover_each_stratum_once():
    t = stratified_times(64, torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() < 1
    strata = torch.sort(torch.floor(torch.remainder(t - t.min(), 1.0) * 64)).values
    assert torch.equal(strata, torch.arange(64, dtype=strata.dtype))
