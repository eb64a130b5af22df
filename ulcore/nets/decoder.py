"""The diffusion decoder D_θ: p(x | z_0) (UL §3.2, §5.1; docs/method.md §6, §10).

forward(x_t, logsnr, z0) -> v̂ with v = α ε − σ x (v-parameterisation, docs/method.md §10, D3).

A U-ViT (Hoogeboom et al. 2023/2024): 2×2 space-to-depth patching -> conv residual levels
m.decoder_channels (m.decoder_blocks FiLM-conditioned blocks each, a strided 2× downsample between levels)
-> a middle transformer (m.decoder_width, m.decoder_depth adaLN-zero blocks) on the innermost grid -> the
mirrored up path, each block taking the matching down-path activation as a skip -> a zero-initialised
conv and depth-to-space (v̂ = 0 at init). Dropout m.dropout in every block.

z_0 enters twice (docs/method.md §10, D4): linearly projected and added to the middle transformer's tokens
(nearest-upsampled when the inner grid is finer than the latent grid; config validation forbids coarser),
and nearest-upsampled to the patched input resolution and concatenated to the patched x_t. The decoder has
no class conditioning (the paper's decoder is not text/class conditioned).

Video (m.frames > 1): the same net with 3D convs, m.temporal_kernel frames wide (1: per-frame convs, time mixed
by the transformer alone); the decoder keeps full temporal resolution (patch and downsampling are spatial only)
and its transformer attends over all (T, h, w) tokens; z_0's coarser time axis is nearest-upsampled like its
spatial axes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ulcore.config import ModelConfig
from ulcore.nets.layers import (Downsample, NoiseEmbedding, PositionCache, ResBlock, TransformerBlock, Upsample,
                                check_input, conv, depth_to_space, grid_to_tokens, group_count, resize_nearest,
                                space_to_depth, tokens_to_grid, zero_)


class UViTDecoder(nn.Module):
    """x_t (B, 3, [T,] H, W), λ (B,), z0 (B, C, [T',] H/d, W/d) -> v̂ (B, 3, [T,] H, W)."""

    def __init__(self, m: ModelConfig):
        super().__init__()
        self.dims = 3 if m.frames > 1 else 2
        self.in_channels = m.in_channels
        self.latent_channels = m.latent_channels
        p = m.patch_size
        self.patch = (1, p, p) if self.dims == 3 else (p, p)
        down = (1, 2, 2) if self.dims == 3 else (2, 2)
        chans = list(m.decoder_channels)
        width = m.decoder_width
        cond_dim = width
        patched = m.in_channels * math.prod(self.patch)

        self.noise = NoiseEmbedding(cond_dim)
        tk, g = m.temporal_kernel, m.norm_groups
        self.stem = conv(self.dims, patched + m.latent_channels, chans[0], temporal_kernel=tk)
        self.down = nn.ModuleList()
        skip_chans = []
        for i, c in enumerate(chans):
            for _ in range(m.decoder_blocks):
                self.down.append(ResBlock(self.dims, c, c, cond_dim, m.dropout, temporal_kernel=tk, norm_groups=g))
                skip_chans.append(c)
            if i + 1 < len(chans):
                self.down.append(Downsample(self.dims, c, chans[i + 1], down, temporal_kernel=tk))

        self.to_tokens = nn.Linear(chans[-1], width)
        self.z_tokens = nn.Linear(m.latent_channels, width)
        self.position = PositionCache(width)
        self.middle = nn.ModuleList([TransformerBlock(width, m.heads, cond_dim, dropout=m.dropout)
                                     for _ in range(m.decoder_depth)])
        self.middle_norm = nn.LayerNorm(width, eps=1e-6)
        self.from_tokens = nn.Linear(width, chans[-1])

        self.up = nn.ModuleList()
        for i in reversed(range(len(chans))):
            c = chans[i]
            for _ in range(m.decoder_blocks):
                self.up.append(ResBlock(self.dims, c + skip_chans.pop(), c, cond_dim, m.dropout,
                                        temporal_kernel=tk, norm_groups=g))
            if i > 0:
                self.up.append(Upsample(self.dims, c, chans[i - 1], down, temporal_kernel=tk))
        self.out_norm = nn.GroupNorm(group_count(chans[0], g), chans[0])
        self.out = zero_(conv(self.dims, chans[0], patched, temporal_kernel=tk))

    def forward(self, x_t: torch.Tensor, logsnr: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        check_input(x_t, self.dims, self.in_channels, "decoder x_t")
        check_input(z0, self.dims, self.latent_channels, "decoder z0")
        cond = self.noise(logsnr)
        h = space_to_depth(x_t, self.patch)
        z_in = resize_nearest(z0, h.shape[2:]).to(h.dtype)
        h = self.stem(torch.cat([h, z_in], dim=1))
        skips = []
        for layer in self.down:
            if isinstance(layer, ResBlock):
                h = layer(h, cond)
                skips.append(h)
            else:
                h = layer(h)

        grid = h.shape[2:]
        z_mid = grid_to_tokens(resize_nearest(z0, grid))
        x = self.to_tokens(grid_to_tokens(h)) + self.z_tokens(z_mid) + self.position(grid, h.device)
        for block in self.middle:
            x = block(x, cond)
        h = tokens_to_grid(self.from_tokens(self.middle_norm(x)), grid)

        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop().to(h.dtype)], dim=1), cond)
            else:
                h = layer(h)
        v = self.out(F.silu(self.out_norm(h)))
        return depth_to_space(v, self.patch).to(x_t.dtype)


def build_decoder(m: ModelConfig) -> UViTDecoder:
    return UViTDecoder(m)
