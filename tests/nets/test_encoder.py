"""Encoder: shapes for images and video, the initial latent scale, and gradient flow from both stage-1 losses
(prior path and decoder path) into every encoder parameter."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tests.nets.netkit import model_config, pixels, wake_zero_params
from ulcore.nets import build_decoder, build_encoder, build_prior


def test_encoder_shape(m):
    enc = build_encoder(m)
    z = enc(pixels(m, 2))
    d = m.downsample
    if m.frames > 1:
        assert z.shape == (2, m.latent_channels, m.frames // m.temporal_downsample, 32 // d, 32 // d)
    else:
        assert z.shape == (2, m.latent_channels, 32 // d, 32 // d)
    assert enc.factors[-2:] == (d, d)


def test_encoder_other_resolution():
    m = model_config("tiny")
    assert build_encoder(m)(pixels(m, 1, resolution=64)).shape == (1, m.latent_channels, 16, 16)


@pytest.mark.parametrize("temporal_kernel", [1, 3])
def test_temporal_kernel_sets_every_video_conv_but_a_time_halving_one(temporal_kernel):
    """model.temporal_kernel is the time extent of every encoder and decoder conv; the encoder's downsample that
    halves time keeps 3 frames, so no frame is skipped (stride 2 over a 1-frame kernel would drop every other)."""
    m = dataclasses.replace(model_config("tiny-video"), temporal_kernel=temporal_kernel)
    for net in (build_encoder(m), build_decoder(m)):
        for name, module in net.named_modules():
            if isinstance(module, torch.nn.Conv3d):
                if module.stride[0] == 2:  # halves time
                    expected = max(temporal_kernel, 3)
                else:  # 1×1×1 skips stay pointwise
                    expected = 1 if module.kernel_size[1] == 1 else temporal_kernel
                assert module.kernel_size[0] == expected, name
                assert module.padding[0] == expected // 2, name
    assert any(isinstance(mod, torch.nn.Conv3d) and mod.stride[0] == 2 for mod in build_encoder(m).modules())


def test_encoder_rejects_wrong_layout(m):
    enc = build_encoder(m)
    with pytest.raises(ValueError, match="encoder: expected"):
        enc(torch.zeros(1, 3, 32))


def test_initial_latent_scale_is_moderate(m):
    # no output normalisation (docs/method.md §10, D6), but z_clean starts well above σ₀ ≈ 0.08 and near std 1
    torch.manual_seed(0)
    z = build_encoder(m)(pixels(m, 8))
    assert 0.4 < z.std().item() < 2.0
    assert z.mean().abs().item() < 0.5


@pytest.mark.parametrize("path", ["prior", "decoder"])
def test_every_encoder_parameter_gets_gradient(m, path):
    """A stage-1 loss through either net alone reaches every encoder weight (UL Alg. 1: both terms train E)."""
    torch.manual_seed(0)
    enc = build_encoder(m)
    x = pixels(m, 2)
    z = enc(x)
    logsnr = torch.tensor([-3.0, 2.0])
    alpha = torch.sigmoid(logsnr).sqrt().view(-1, *[1] * (z.ndim - 1))
    sigma = torch.sigmoid(-logsnr).sqrt().view(-1, *[1] * (z.ndim - 1))
    if path == "prior":
        net = build_prior(m)
        wake_zero_params(net)
        eps = torch.randn_like(z)
        v_hat = net(alpha * z + sigma * eps, logsnr)
        loss = (v_hat - (alpha * eps - sigma * z)).square().sum()
    else:
        net = build_decoder(m)
        wake_zero_params(net)
        z0 = math.sqrt(torch.sigmoid(torch.tensor(5.0))) * z + 0.08 * torch.randn_like(z)
        eps = torch.randn_like(x)
        v_hat = net(alpha * x + sigma * eps, logsnr, z0)
        loss = (v_hat - (alpha * eps - sigma * x)).square().sum()
    loss.backward()
    for name, p in [*enc.named_parameters(), *net.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{path}: no gradient reaches {name}"
