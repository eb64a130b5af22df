"""The study's verdicts on synthetic numbers: reproduced, not reproduced, ties within the tolerance, missing numbers."""

from __future__ import annotations

import pytest

from ulcore.study.verdicts import (BASE_VS_PRIOR_CLAIM, LOGSNR_0_CLAIM, LOSS_FACTOR_CLAIM, base_vs_prior_verdict,
                                   logsnr_0_verdict, loss_factor_verdict, rises)


def test_rises_sorts_by_x_and_forgives_dips_within_the_tolerance_only():
    assert rises([3.0, 1.3, 2.1, 1.7], [4.0, 1.0, 3.0, 2.0], tol=0.1) == (True, "rises")
    assert rises([1, 2, 3], [1.0, 0.95, 2.0], tol=0.1)[0] is True  # a 0.05 dip is noise
    ok, why = rises([1, 2, 3], [1.0, 0.8, 2.0], tol=0.1)
    assert not ok and why == "falls from 1 to 2"
    ok, why = rises([1, 2, 3], [1.0, 1.05, 1.08], tol=0.1)  # never falls, but never clearly rises either
    assert not ok and "within the tie tolerance 0.1" in why


def test_loss_factor_reproduced_when_rate_and_psnr_both_rise():
    v = loss_factor_verdict([(1.3, 0.02, 14.0), (1.7, 0.04, 15.5), (2.1, 0.05, 16.2), (3.0, 0.08, 17.9)])
    assert v.reproduced and v.claim == LOSS_FACTOR_CLAIM
    assert v.text == ("reproduced: c_lf 1.3 → 1.7 → 2.1 → 3 gives bits/pixel 0.02 → 0.04 → 0.05 → 0.08 (rises) and "
                      "PSNR 14.00 → 15.50 → 16.20 → 17.90 dB (rises)")
    assert v.line.startswith(f"**{LOSS_FACTOR_CLAIM}** — reproduced")


def test_loss_factor_not_reproduced_when_psnr_falls_or_the_rate_is_flat():
    falls = loss_factor_verdict([(1.3, 0.02, 15.0), (1.7, 0.04, 14.0), (3.0, 0.08, 17.9)])
    assert not falls.reproduced and falls.text.startswith("not reproduced") and "falls from 1.3 to 1.7" in falls.text
    collapsed = loss_factor_verdict([(1.3, 0.0005, 12.0), (1.7, 0.0006, 12.5), (3.0, 0.0009, 13.0)])
    assert not collapsed.reproduced and "within the tie tolerance 0.002" in collapsed.text


def test_loss_factor_not_measured_below_two_settings_with_numbers():
    v = loss_factor_verdict([(1.3, None, 14.0), (3.0, 0.08, 17.9)])
    assert not v.reproduced and v.text == "not measured: 1 loss factor(s) with numbers, need 2"


def test_logsnr_0_collapse():
    v = logsnr_0_verdict(0.08, 0.004, 17.9, 12.1)
    assert v.reproduced and v.claim == LOGSNR_0_CLAIM
    assert v.text == ("reproduced: λ(0) = 10 gives 0.004 bits/pixel against 0.08 at λ(0) = 5 (×0.05; a collapse is "
                      "≤ ×0.5) and PSNR 12.10 against 17.90 dB")
    assert logsnr_0_verdict(0.08, 0.004, 17.9, 17.95).reproduced  # PSNR equal within 0.1 dB: not better


def test_logsnr_0_not_reproduced_without_a_collapse_or_with_better_reconstructions():
    flat = logsnr_0_verdict(0.08, 0.07, 17.9, 16.0)
    assert not flat.reproduced and flat.text.startswith("not reproduced (the rate does not collapse)")
    assert "(×0.88;" in flat.text
    better = logsnr_0_verdict(0.08, 0.01, 17.9, 18.5)
    assert not better.reproduced and better.text.startswith("not reproduced (the reconstructions are better)")
    missing = logsnr_0_verdict(0.08, None, 17.9, 12.0)
    assert not missing.reproduced and missing.text.startswith("not measured")


@pytest.mark.parametrize("base,prior,reproduced,why", [
    (250.0, 300.0, True, "reproduced: gFID 250.0 from the base model against 300.0 from the prior (N = 200), -50.0"),
    (298.0, 300.0, False, "not reproduced (a tie within ±10)"),
    (291.0, 300.0, False, "not reproduced (a tie within ±10)"),  # 9 apart: N = 200's noise
    (320.0, 300.0, False, "not reproduced (the prior is better)"),
    (None, 300.0, False, "not measured"),
])
def test_base_vs_prior(base, prior, reproduced, why):
    v = base_vs_prior_verdict(base, prior, num_samples=200)
    assert v.claim == BASE_VS_PRIOR_CLAIM and v.reproduced is reproduced and v.text.startswith(why)
