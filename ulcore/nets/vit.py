"""Diffusion ViTs on the latent grid: the stage-1 prior and the stage-2 base model (UL §2, §3.3, §5.1;
docs/method.md §4, §8, §10).

Both predict v = α ε − σ z_clean (v-parameterisation, docs/method.md §10, D3); the loss code converts
v̂ to ε̂ = σ z_t + α v̂ and ẑ = α z_t − σ v̂. Both work at patch size 1 on the latent grid (h, w) or, for
video, on spatio-temporal tokens (T', h, w), with fixed sin-cos position embeddings (any grid size),
adaLN-zero blocks conditioned on an embedding of λ, and a zero-initialised output (v̂ = 0 at init).

- `LatentViT` (the prior; UL: "single-level ViT, 8 blocks, 1024 channels"): m.prior_depth blocks of width
  m.prior_width. No dropout: the prior is part of the likelihood bound.
- `TwoLevelViT` (the base model; UL: "2-level ViT, channels [512, 1024], blocks [6, 16], dropout 0.1"): an
  outer level of width base_widths[0] at the latent grid with base_depths[0]/2 blocks before and after an
  inner level of width base_widths[1] and base_depths[1] blocks on 2×2-merged tokens; the split tokens are
  joined with the outer skip (concatenate + linear). The class embedding has num_classes + 1 rows, the last
  being the null class of classifier-free guidance; it is added to the noise embedding.
  Odd or 1-wide latent grids are zero-padded to even before the merge and cropped after the split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ulcore.config import ModelConfig
from ulcore.nets.layers import (FinalLayer, NoiseEmbedding, PositionCache, TransformerBlock, check_input,
                                depth_to_space, grid_to_tokens, space_to_depth, tokens_to_grid)


class LatentViT(nn.Module):
    """The prior: z_t (B, C, [T',] h, w), λ (B,) -> v̂ of the same shape."""

    def __init__(self, channels: int, width: int, depth: int, heads: int, dims: int, dropout: float = 0.0):
        super().__init__()
        self.dims = dims
        self.channels = channels
        self.noise = NoiseEmbedding(width)
        self.embed = nn.Linear(channels, width)
        self.position = PositionCache(width)
        self.blocks = nn.ModuleList([TransformerBlock(width, heads, width, dropout=dropout) for _ in range(depth)])
        self.final = FinalLayer(width, width, channels)

    def forward(self, z_t: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        check_input(z_t, self.dims, self.channels, "prior")
        grid = z_t.shape[2:]
        cond = self.noise(logsnr)
        x = self.embed(grid_to_tokens(z_t)) + self.position(grid, z_t.device)
        for block in self.blocks:
            x = block(x, cond)
        return tokens_to_grid(self.final(x, cond), grid).to(z_t.dtype)


class TwoLevelViT(nn.Module):
    """The base model: z_t (B, C, [T',] h, w), λ (B,), labels (B,) int64 in [0, num_classes] -> v̂.

    Label num_classes is the null class (unconditional branch of classifier-free guidance).
    """

    def __init__(self, channels: int, widths: tuple[int, int], depths: tuple[int, int], heads: int,
                 num_classes: int, dims: int, dropout: float = 0.0):
        super().__init__()
        outer, inner = widths
        self.dims = dims
        self.channels = channels
        self.num_classes = num_classes
        self.merge_factors = (1, 2, 2) if dims == 3 else (2, 2)  # spatial 2×2 merge; time is kept
        merged = 4 * outer
        cond_dim = inner
        self.noise = NoiseEmbedding(cond_dim)
        self.label = nn.Embedding(num_classes + 1, cond_dim)
        nn.init.normal_(self.label.weight, std=0.02)
        self.embed = nn.Linear(channels, outer)
        self.outer_position = PositionCache(outer)
        self.inner_position = PositionCache(inner)
        n_pre = depths[0] // 2

        def blocks(width: int, n: int) -> nn.ModuleList:
            return nn.ModuleList([TransformerBlock(width, heads, cond_dim, dropout=dropout) for _ in range(n)])

        self.pre = blocks(outer, n_pre)
        self.merge = nn.Linear(merged, inner)
        self.inner = blocks(inner, depths[1])
        self.split = nn.Linear(inner, merged)
        self.join = nn.Linear(2 * outer, outer)
        self.post = blocks(outer, depths[0] - n_pre)
        self.final = FinalLayer(outer, cond_dim, channels)

    def conditioning(self, logsnr: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Noise embedding + class embedding (row num_classes = null class). The range check runs on CPU only,
        where it costs nothing; on GPU it would synchronise every step (an out-of-range label asserts there)."""
        if labels.dtype != torch.long or labels.shape != logsnr.shape:
            raise ValueError(f"base model: labels must be int64 of shape {tuple(logsnr.shape)}, "
                             f"got {labels.dtype} {tuple(labels.shape)}")
        if labels.device.type == "cpu" and labels.numel() and (labels.min() < 0 or labels.max() > self.num_classes):
            raise ValueError(f"base model: labels must lie in [0, {self.num_classes}] ({self.num_classes} = null)")
        return self.noise(logsnr) + self.label(labels)

    def forward(self, z_t: torch.Tensor, logsnr: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        check_input(z_t, self.dims, self.channels, "base model")
        grid = tuple(z_t.shape[2:])
        cond = self.conditioning(logsnr, labels)
        x = self.embed(grid_to_tokens(z_t)) + self.outer_position(grid, z_t.device)
        for block in self.pre:
            x = block(x, cond)
        skip = x
        # 2×2 token merge; pad h, w to even so any latent grid works (the padding is cropped after the split)
        h_pad, w_pad = grid[-2] % 2, grid[-1] % 2
        x = tokens_to_grid(x, grid)
        if h_pad or w_pad:
            x = F.pad(x, (0, w_pad, 0, h_pad))
        padded = tuple(x.shape[2:])
        x = space_to_depth(x, self.merge_factors)
        inner_grid = tuple(x.shape[2:])
        x = self.merge(grid_to_tokens(x)) + self.inner_position(inner_grid, z_t.device)
        for block in self.inner:
            x = block(x, cond)
        x = depth_to_space(tokens_to_grid(self.split(x), inner_grid), self.merge_factors)
        assert tuple(x.shape[2:]) == padded
        x = grid_to_tokens(x[..., : grid[-2], : grid[-1]])
        x = self.join(torch.cat([x, skip.to(x.dtype)], dim=-1))
        for block in self.post:
            x = block(x, cond)
        return tokens_to_grid(self.final(x, cond), grid).to(z_t.dtype)


def build_prior(m: ModelConfig) -> LatentViT:
    return LatentViT(m.latent_channels, m.prior_width, m.prior_depth, m.heads, dims=3 if m.frames > 1 else 2)


def build_base_model(m: ModelConfig) -> TwoLevelViT:
    return TwoLevelViT(m.latent_channels, (m.base_widths[0], m.base_widths[1]), (m.base_depths[0], m.base_depths[1]),
                       m.heads, m.num_classes, dims=3 if m.frames > 1 else 2, dropout=m.dropout)
