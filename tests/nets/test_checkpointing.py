"""Activation checkpointing: with recomputation on, every net (images and video, dropout included) gives the same
loss and the same gradient for every parameter and input as without; eval mode and no_grad take the plain path;
the stage objectives take the flag from their config section."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from tests.nets.netkit import latents, pixels, wake_zero_params
from ulcore.config import load_config
from ulcore.nets import (build_base_model, build_decoder, build_encoder, build_prior, layers,
                         set_activation_checkpointing)
from ulcore.train.stage1 import Stage1Objective
from ulcore.train.stage2 import Stage2Objective

BUILD = {"encoder": build_encoder, "prior": build_prior, "decoder": build_decoder, "base": build_base_model}
TINY = ["model.encoder_channels=[8,16]", "model.decoder_channels=[8,16]", "model.prior_width=32",
        "model.prior_depth=2", "model.decoder_width=32", "model.decoder_depth=2", "model.heads=2",
        "model.base_widths=[32,32]", "model.base_depths=[2,2]", "model.dropout=0.1"]


def net_inputs(name: str, m) -> tuple[torch.Tensor, ...]:
    x, z = pixels(m, 2, 16).requires_grad_(), latents(m, 2, 16).requires_grad_()
    logsnr = torch.tensor([-3.0, 4.0])
    return {"encoder": (x,), "prior": (z, logsnr), "decoder": (x, logsnr, z),
            "base": (z, logsnr, torch.tensor([1, m.num_classes]))}[name]


def loss_and_grads(net: torch.nn.Module, inputs: tuple[torch.Tensor, ...], bf16: bool = False):
    """A squared-output loss and the gradient of every parameter and pixel or latent input; dropout seeded."""
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = net(*inputs).float().square().mean()
    leaves = [p for p in net.parameters()] + [t for t in inputs if t.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, leaves)


def twins(name: str, m) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A trained-looking net (zero-initialised gates woken up) and an exact copy that recomputes its blocks."""
    torch.manual_seed(0)
    plain = BUILD[name](dataclasses.replace(m, dropout=0.1)).train()
    wake_zero_params(plain)
    recomputing = copy.deepcopy(plain)
    assert set_activation_checkpointing(recomputing, True) > 0
    return plain, recomputing


@pytest.mark.parametrize("name", list(BUILD))
def test_recomputation_gives_the_same_loss_and_gradients(m, name):
    plain, recomputing = twins(name, m)
    inputs = net_inputs(name, m)
    loss, grads = loss_and_grads(plain, inputs)
    loss_r, grads_r = loss_and_grads(recomputing, inputs)
    assert loss > 0 and any(g.abs().sum() > 0 for g in grads)
    torch.testing.assert_close(loss_r, loss, rtol=1e-6, atol=0.0)
    for g_r, g in zip(grads_r, grads, strict=True):
        torch.testing.assert_close(g_r, g, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ["decoder", "base"])
def test_recomputation_replays_bf16_autocast(m, name):
    plain, recomputing = twins(name, m)
    inputs = net_inputs(name, m)
    loss, grads = loss_and_grads(plain, inputs, bf16=True)
    loss_r, grads_r = loss_and_grads(recomputing, inputs, bf16=True)
    torch.testing.assert_close(loss_r, loss, rtol=1e-6, atol=0.0)
    for g_r, g in zip(grads_r, grads, strict=True):
        torch.testing.assert_close(g_r, g, rtol=1e-5, atol=1e-8)


def test_only_training_with_grad_recomputes(m, monkeypatch):
    calls = []

    def counting_checkpoint(fn, *args, **kwargs):
        calls.append(fn)
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(layers, "checkpoint", counting_checkpoint)
    _, decoder = twins("decoder", m)
    blocks = sum(isinstance(b, layers.RecomputableBlock) for b in decoder.modules())
    inputs = net_inputs("decoder", m)
    decoder(*inputs)
    assert len(calls) == blocks
    calls.clear()
    with torch.no_grad():
        decoder(*inputs)
    decoder.eval()
    decoder(*inputs)
    assert calls == []
    set_activation_checkpointing(decoder.train(), False)
    decoder(*inputs)
    assert calls == []


def test_stage_objectives_follow_their_config_flag():
    off = load_config(None, TINY)
    on = load_config(None, [*TINY, "stage1.activation_checkpointing=true", "stage2.activation_checkpointing=true"])
    batch1 = {"x": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))}
    batch2 = {"z": latents(off.model, 2, 32), "cls": torch.tensor([0, 3])}
    for objective, batch in ((Stage1Objective, batch1), (Stage2Objective, batch2)):
        results = []
        for cfg in (off, on):
            torch.manual_seed(0)
            obj = objective(cfg).train()
            wake_zero_params(obj)
            assert {b.recompute for b in obj.modules() if isinstance(b, layers.RecomputableBlock)} == {cfg is on}
            torch.manual_seed(7)
            loss = obj(batch, torch.Generator().manual_seed(1)).loss.mean()
            results.append((loss.detach(), torch.autograd.grad(loss, list(obj.parameters()))))
        (loss, grads), (loss_r, grads_r) = results
        torch.testing.assert_close(loss_r, loss, rtol=1e-6, atol=0.0)
        for g_r, g in zip(grads_r, grads, strict=True):
            torch.testing.assert_close(g_r, g, rtol=1e-5, atol=1e-8)
