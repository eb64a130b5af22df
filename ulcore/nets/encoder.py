"""The deterministic encoder E_θ: x -> z_clean (UL §3.1, §5.1; docs/method.md §3, §10).

A ResNet: 2×2 space-to-depth patching (m.patch_size), one stage per m.encoder_channels entry with
m.encoder_blocks residual blocks (GroupNorm + SiLU), a strided 2× downsample between stages, and a final
GN-SiLU-conv projection to m.latent_channels. Spatial factor d = m.downsample = patch · 2^(stages-1).

No output normalisation (docs/method.md §10, D6): the prior's KL term prices the latent's scale. The output
conv is initialised so that z_clean starts with std ≈ 1, i.e. well above the fixed encoding noise σ₀ ≈ 0.08.

Video (m.frames > 1): the same net with 3D convolutions. The temporal factor m.temporal_downsample is spread
over the stage transitions, 2× at each of the first ones while it stays divisible by 2; whatever is left (an
odd factor, or more than the stages can take) becomes a temporal patch size in the space-to-depth step.
The convs are m.temporal_kernel frames wide (1: per frame), but a downsample that halves time spans 3 frames.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ulcore.config import ModelConfig
from ulcore.nets.layers import Downsample, ResBlock, check_input, conv, group_count, space_to_depth


def temporal_plan(frames_factor: int, transitions: int) -> tuple[int, list[int]]:
    """Split a temporal downsampling factor into (temporal patch, per-transition factors): 2× per transition
    from the first one while the factor allows, the rest in the patch. E.g. (4, 3) -> (1, [2, 2, 1]);
    (2, 1) -> (1, [2]); (3, 2) -> (3, [1, 1]); (8, 1) -> (4, [2])."""
    per_stage = []
    remaining = frames_factor
    for _ in range(transitions):
        if remaining % 2 == 0:
            per_stage.append(2)
            remaining //= 2
        else:
            per_stage.append(1)
    return remaining, per_stage


class Encoder(nn.Module):
    """x (B, 3, [T,] H, W) in [-1, 1] -> z_clean (B, C, [T/td,] H/d, W/d)."""

    def __init__(self, m: ModelConfig):
        super().__init__()
        self.dims = 3 if m.frames > 1 else 2
        self.in_channels = m.in_channels
        self.latent_channels = m.latent_channels
        chans = list(m.encoder_channels)
        p = m.patch_size
        if self.dims == 3:
            t_patch, t_stage = temporal_plan(m.temporal_downsample, len(chans) - 1)
            self.patch = (t_patch, p, p)
            stage_factors = [(t, 2, 2) for t in t_stage]
        else:
            self.patch = (p, p)
            stage_factors = [(2, 2)] * (len(chans) - 1)
        tk = m.temporal_kernel
        self.stem = conv(self.dims, m.in_channels * math.prod(self.patch), chans[0], temporal_kernel=tk)
        self.stages = nn.ModuleList()
        for i, c in enumerate(chans):
            stage = nn.Sequential(*[ResBlock(self.dims, c, c, temporal_kernel=tk, norm_groups=m.norm_groups)
                                    for _ in range(m.encoder_blocks)])
            if i + 1 < len(chans):
                stage.append(Downsample(self.dims, c, chans[i + 1], stage_factors[i], temporal_kernel=tk))
            self.stages.append(stage)
        self.out_norm = nn.GroupNorm(group_count(chans[-1], m.norm_groups), chans[-1])
        self.out = conv(self.dims, chans[-1], m.latent_channels, temporal_kernel=tk)
        # std(z) ≈ 1 at init: inputs to the last conv are SiLU(N(0,1)) with E[SiLU(u)²] ≈ 0.356, so the weights
        # get variance 1 / (0.356 · fan_in).
        fan_in = self.out.weight[0].numel()
        nn.init.normal_(self.out.weight, std=1.0 / math.sqrt(0.356 * fan_in))
        nn.init.zeros_(self.out.bias)

    @property
    def factors(self) -> tuple[int, ...]:
        """Total downsampling per axis, pixels -> latent grid."""
        f = list(self.patch)
        for stage in self.stages:
            last = stage[-1]
            if isinstance(last, Downsample):
                f = [a * b for a, b in zip(f, last.conv.stride)]
        return tuple(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.dims, self.in_channels, "encoder")
        h = self.stem(space_to_depth(x, self.patch))
        for stage in self.stages:
            h = stage(h)
        return self.out(nn.functional.silu(self.out_norm(h))).to(x.dtype)
