"""Decoder: shapes (images and video), v̂ = 0 at init, and dependence on z_0 through both injection points."""

from __future__ import annotations

import pytest
import torch

from tests.nets.netkit import latents, model_config, pixels, wake_zero_params
from ulcore.nets import build_decoder


def test_decoder_shape_and_zero_init(m):
    dec = build_decoder(m)
    x = pixels(m, 2)
    v = dec(x, torch.tensor([-10.0, 10.0]), latents(m, 2))
    assert v.shape == x.shape and v.dtype == x.dtype
    assert torch.equal(v, torch.zeros_like(v))


def test_decoder_output_depends_on_z0(m):
    torch.manual_seed(0)
    dec = build_decoder(m).eval()
    wake_zero_params(dec)
    x, logsnr = pixels(m, 2), torch.tensor([0.0, 4.0])
    z0 = latents(m, 2)
    a = dec(x, logsnr, z0)
    b = dec(x, logsnr, latents(m, 2, seed=7))
    assert (a - b).abs().mean() > 1e-4
    assert not torch.allclose(a, dec(x, torch.tensor([1.0, 4.0]), z0))  # and on λ


@pytest.mark.parametrize("route", ["input", "tokens"])
def test_each_z0_route_alone_conditions_the_output(route):
    torch.manual_seed(0)
    m = model_config("tiny")
    dec = build_decoder(m).eval()
    wake_zero_params(dec)
    with torch.no_grad():
        if route == "input":  # cut the token route: z0 only enters through the concatenated input
            dec.z_tokens.weight.zero_()
        else:  # cut the input route: zero the stem's z0 input channels
            dec.stem.weight[:, -m.latent_channels:].zero_()
    x, logsnr = pixels(m, 1), torch.zeros(1)
    a, b = dec(x, logsnr, latents(m, 1)), dec(x, logsnr, latents(m, 1, seed=9))
    assert (a - b).abs().mean() > 1e-5


def test_decoder_dropout_only_in_training():
    torch.manual_seed(0)
    m = model_config("tiny")
    from dataclasses import replace
    dec = build_decoder(replace(m, dropout=0.5))
    wake_zero_params(dec)
    x, logsnr, z0 = pixels(m, 1), torch.zeros(1), latents(m, 1)
    dec.eval()
    assert torch.equal(dec(x, logsnr, z0), dec(x, logsnr, z0))
    dec.train()
    assert not torch.equal(dec(x, logsnr, z0), dec(x, logsnr, z0))


def test_decoder_rejects_latent_with_wrong_channels():
    m = model_config("tiny")
    with pytest.raises(ValueError, match="decoder z0"):
        build_decoder(m)(pixels(m, 1), torch.zeros(1), torch.zeros(1, m.latent_channels + 1, 8, 8))
