"""The stage-1 objective itself: named per-example terms, no stop-gradient, loss-factor scaling, bf16 vs fp32."""

import dataclasses

import pytest
import torch

from ulcore.config import load_config
from ulcore.runtime import autocast
from ulcore.train.loop import named_terms
from ulcore.train.stage1 import Stage1Objective

OVERRIDES = ["model.encoder_channels=[8,16]", "model.decoder_channels=[8,16]", "model.prior_width=32",
             "model.prior_depth=1", "model.decoder_width=32", "model.decoder_depth=1", "model.heads=2"]


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, OVERRIDES)


def _batch(n=4):
    return {"x": torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))}


def _trained_a_little(cfg):
    """Zero-initialised outputs make ε̂ independent of the inputs; one optimiser step wakes every path up."""
    torch.manual_seed(0)
    obj = Stage1Objective(cfg)
    opt = torch.optim.SGD(obj.parameters(), lr=1e-3)
    obj(_batch(), torch.Generator().manual_seed(1)).loss.mean().backward()
    opt.step()
    obj.zero_grad()
    return obj


def test_terms_are_per_example_and_sum_to_the_loss(cfg):
    terms = _trained_a_little(cfg)(_batch(), torch.Generator().manual_seed(2))
    logged = named_terms(terms)  # what the training loop logs, under the metric names earlier runs used
    assert list(logged) == ["loss", "prior_diffusion", "prior_kl_1", "decoder", "bits_per_pixel", "bits_per_subpixel",
                            "latent_std"]
    assert all(v.shape == (4,) for v in logged.values())
    torch.testing.assert_close(terms.loss, terms.prior_diffusion + terms.prior_kl_1 + terms.decoder)
    pixels = 32 * 32
    torch.testing.assert_close(terms.bits_per_pixel,
                               (terms.prior_diffusion + terms.prior_kl_1) / (pixels * torch.log(torch.tensor(2.0))))
    torch.testing.assert_close(terms.bits_per_subpixel, terms.bits_per_pixel / 3)  # RGB: ÷ H·W·C


@pytest.mark.parametrize("term", ["prior", "decoder"])
def test_gradients_reach_the_encoder_through_both_terms(cfg, term):
    obj = _trained_a_little(cfg)
    terms = obj(_batch(), torch.Generator().manual_seed(3))
    loss = terms.prior_diffusion + terms.prior_kl_1 if term == "prior" else terms.decoder
    loss.mean().backward()
    grads = [p.grad for p in obj.encoder.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


def test_decoder_term_scales_exactly_with_the_loss_factor(cfg):
    obj = _trained_a_little(cfg)
    base = obj(_batch(), torch.Generator().manual_seed(4))
    obj.loss_factor *= 2
    doubled = obj(_batch(), torch.Generator().manual_seed(4))
    torch.testing.assert_close(doubled.decoder, 2 * base.decoder)
    torch.testing.assert_close(doubled.prior_diffusion, base.prior_diffusion)


def test_bf16_and_fp32_losses_agree(cfg):
    obj = _trained_a_little(cfg)
    cpu = torch.device("cpu")
    with torch.no_grad():
        fp32 = obj(_batch(2), torch.Generator().manual_seed(5)).loss
        with autocast("bf16", cpu):
            bf16 = obj(_batch(2), torch.Generator().manual_seed(5)).loss
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.5)


def test_config_travels_with_the_objective(cfg):
    obj = Stage1Objective(cfg)
    assert obj.config is cfg and dataclasses.is_dataclass(obj.config)


def test_draws_come_from_the_generators_device_and_reproduce(cfg):
    """The training loop hands the objective a generator on the nets' device (no host-side noise to copy each
    step); on the CPU the same seed gives the same loss, bit for bit."""
    from ulcore.train.loop import step_generator

    obj = _trained_a_little(cfg)
    first = obj(_batch(), step_generator(3, 0, 7)).loss
    again = obj(_batch(), step_generator(3, 0, 7, torch.device("cpu"))).loss
    other = obj(_batch(), step_generator(3, 0, 8)).loss
    assert torch.equal(first, again) and not torch.equal(first, other)
