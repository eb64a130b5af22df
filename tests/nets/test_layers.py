"""Shared blocks: patching round trips and ordering, position and noise embeddings, and the accounting
helpers against closed forms."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from tests.nets.netkit import model_config
from ulcore.nets import build_decoder, build_encoder, count_params, forward_flops
from ulcore.nets.encoder import temporal_plan
from ulcore.nets.layers import (Attention, NoiseEmbedding, depth_to_space, group_count, resize_nearest, sincos_position,
                                space_to_depth)


@pytest.mark.parametrize("shape,factors", [((2, 3, 8, 6), (2, 2)), ((2, 3, 4, 8, 6), (1, 2, 2)),
                                           ((1, 2, 6, 4, 4), (3, 2, 2))])
def test_space_to_depth_round_trip(shape, factors):
    x = torch.randn(shape)
    y = space_to_depth(x, factors)
    assert y.shape == (shape[0], shape[1] * math.prod(factors), *[s // f for s, f in zip(shape[2:], factors)])
    assert torch.equal(depth_to_space(y, factors), x)


def test_space_to_depth_groups_each_patch_into_channels():
    # a 1-channel 4x4 image: output channel (i, j) holds pixel (2a + i, 2b + j) of patch (a, b)
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y = space_to_depth(x, (2, 2))
    assert y[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    assert y[0, :, 1, 1].tolist() == [10.0, 11.0, 14.0, 15.0]


def test_space_to_depth_rejects_indivisible_grid():
    with pytest.raises(ValueError, match="not divisible"):
        space_to_depth(torch.zeros(1, 1, 5, 4), (2, 2))


def test_resize_nearest_repeats_values():
    z = torch.arange(4.0).reshape(1, 1, 2, 2)
    up = resize_nearest(z, (4, 4))
    assert torch.equal(up[0, 0], torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]))
    assert resize_nearest(z, (2, 2)) is z


def test_sincos_position_is_distinct_and_bounded():
    for grid, dim in [((8, 8), 128), ((4, 8, 8), 128), ((3, 5), 10)]:
        pos = sincos_position(grid, dim)
        assert pos.shape == (math.prod(grid), dim)
        assert pos.abs().max() <= 1.0
        assert torch.cdist(pos, pos).add(torch.eye(len(pos)) * 9).min() > 1e-3  # no two positions collide


def test_noise_embedding_separates_close_logsnrs_across_the_range():
    torch.manual_seed(0)
    emb = NoiseEmbedding(64)
    logsnr = torch.tensor([-20.0, -19.9, 0.0, 0.1, 19.9, 20.0])
    e = emb(logsnr)
    assert e.shape == (6, 64) and torch.isfinite(e).all()
    for i in (0, 2, 4):  # Δλ = 0.1 moves the embedding everywhere in [-20, 20]
        assert (e[i] - e[i + 1]).abs().max() > 1e-3


def test_group_count_divides():
    assert group_count(64, 32) == 32 and group_count(48, 32) == 24 and group_count(12, 32) == 12
    assert group_count(7, 32) == 7 and group_count(32, 8) == 8 and group_count(12, 8) == 6 and group_count(5, 1) == 1


@pytest.mark.parametrize("preset,norm_groups", [("tiny", 1), ("tiny", 8), ("tiny", 32), ("tiny-video", 8)])
def test_norm_groups_sets_every_groupnorm_of_the_encoder_and_decoder(preset, norm_groups):
    m = dataclasses.replace(model_config(preset), norm_groups=norm_groups)
    norms = [n for net in (build_encoder(m), build_decoder(m)) for n in net.modules() if isinstance(n, nn.GroupNorm)]
    assert len(norms) >= 4 * len(m.encoder_channels)
    for n in norms:
        assert n.num_groups == group_count(n.num_channels, norm_groups) and n.num_channels % n.num_groups == 0
    assert {n.num_channels // n.num_groups for n in norms if n.num_channels == 32} == {32 // min(32, norm_groups)}


@pytest.mark.parametrize("factor,transitions,expected", [(4, 3, (1, [2, 2, 1])), (2, 1, (1, [2])),
                                                         (3, 2, (3, [1, 1])), (8, 1, (4, [2])), (1, 2, (1, [1, 1]))])
def test_temporal_plan(factor, transitions, expected):
    patch, stages = temporal_plan(factor, transitions)
    assert (patch, stages) == expected
    assert patch * math.prod(stages) == factor


def test_count_params_and_forward_flops_closed_form():
    lin = nn.Linear(16, 8)
    assert count_params(lin) == 16 * 8 + 8
    assert forward_flops(lin, torch.zeros(5, 16)) == 2 * 5 * 16 * 8
    with torch.device("meta"):
        big = nn.Linear(4096, 4096)
    assert count_params(big) == 4096 * 4096 + 4096


def _reference_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) v with QK-norm, written out: what every SDPA backend must compute."""
    b, n, d = x.shape
    h = attn.heads
    q, k, v = attn.qkv(x).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


@pytest.mark.parametrize("tokens", [64, 1100])  # the CPU's short-sequence branch and the long one
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_and_its_gradient_equal_the_written_out_formula(tokens, dtype):
    torch.manual_seed(0)
    attn = Attention(32, heads=4)
    x = torch.randn(2, tokens, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = attn(x)
    (grad,) = torch.autograd.grad(out.float().square().sum(), x)
    want = _reference_attention(attn, x)
    (want_grad,) = torch.autograd.grad(want.square().sum(), x)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert out.dtype == dtype
    assert (out.float() - want).abs().max() <= tol * want.abs().max()
    assert (grad - want_grad).abs().max() <= tol * want_grad.abs().max()
