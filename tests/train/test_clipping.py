"""Gradient clipping for a loss in nats per example: spikes are clipped, steady steps are not."""

import math

import pytest
import torch

from ulcore.train.clipping import RUNNING_MEAN_BETA, GradClipper


def nats_scale_norms(steps: int = 300, spikes: tuple[int, ...] = (50, 120, 121, 250)) -> list[float]:
    """Global grad norms like the tiny preset's (2,000-5,000, drifting), with a few 5-8x spikes."""
    gen = torch.Generator().manual_seed(0)
    norms = [3500 + 1000 * math.sin(i / 40) + 300 * float(torch.randn((), generator=gen)) for i in range(steps)]
    for i in spikes:
        norms[i] *= 5 + 3 * (i % 2)
    return norms


def test_relative_clipping_cuts_the_spikes_and_leaves_steady_steps():
    norms, spikes = nats_scale_norms(), {50, 120, 121, 250}
    clipper = GradClipper("relative", 2.0)
    clipped = {i for i, n in enumerate(norms) if clipper.observe(n)}
    assert clipped == spikes
    assert clipper.clipped_steps == len(spikes)
    assert 2000 < clipper.running_norm < 5000  # the spikes did not drag the threshold up


def test_a_fixed_threshold_of_one_clips_every_nats_scale_step():
    clipper = GradClipper("absolute", 1.0)
    assert all(clipper.observe(n) for n in nats_scale_norms())


def test_zero_turns_clipping_off_in_both_modes():
    for mode in ("relative", "absolute"):
        clipper = GradClipper(mode, 0.0)
        assert not any(clipper.observe(n) for n in nats_scale_norms())


def test_running_norm_is_a_mean_of_clipped_norms():
    clipper = GradClipper("relative", 2.0)
    assert clipper.threshold() == math.inf  # no history: the first step only initialises it
    assert not clipper.observe(100.0) and clipper.running_norm == 100.0
    assert clipper.observe(1000.0)  # > 2 x 100: clipped, and counted in the mean at the threshold, 200
    assert clipper.running_norm == pytest.approx(RUNNING_MEAN_BETA * 100 + (1 - RUNNING_MEAN_BETA) * 200)
    before = clipper.running_norm
    assert not clipper.observe(float("nan")) and clipper.running_norm == before


def test_clip_scales_the_gradient_to_the_threshold_and_reports_the_norm_before():
    w = torch.nn.Parameter(torch.zeros(4))
    clipper = GradClipper("relative", 2.0)
    clipper.load_state_dict({"running_norm": 10.0, "clipped_steps": 3})
    w.grad = torch.tensor([30.0, 40.0, 0.0, 0.0])  # norm 50 > 2 x 10
    norm, clipped = clipper.clip_([w])
    assert clipped and norm == pytest.approx(50.0)
    assert w.grad.norm().item() == pytest.approx(20.0, rel=1e-5)
    assert clipper.state_dict()["clipped_steps"] == 4
    w.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])  # steady: untouched
    norm, clipped = clipper.clip_([w])
    assert not clipped and torch.equal(w.grad, torch.tensor([3.0, 4.0, 0.0, 0.0]))


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="grad_clip_mode = 'median': must be relative or absolute"):
        GradClipper("median", 2.0)
