"""Helpers for the nets tests: model configs of the presets, seeded inputs, and waking zero-initialised
parameters (adaLN-zero gates, output heads) so gradient-flow and conditioning tests see a net past its first
optimiser step."""

from __future__ import annotations

import torch

from ulcore.config import PRESETS, ModelConfig


def model_config(preset: str) -> ModelConfig:
    return ModelConfig(**PRESETS[preset].get("model", {}))


def pixels(m: ModelConfig, batch: int, resolution: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    time = (m.frames,) if m.frames > 1 else ()
    return torch.rand(batch, m.in_channels, *time, resolution, resolution, generator=g) * 2 - 1


def latents(m: ModelConfig, batch: int, resolution: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    time = (m.frames // m.temporal_downsample,) if m.frames > 1 else ()
    h = resolution // m.downsample
    return torch.randn(batch, m.latent_channels, *time, h, h, generator=g)


def wake_zero_params(module: torch.nn.Module, std: float = 0.02, seed: int = 123) -> None:
    """Give every all-zero parameter small random values (what one optimiser step would do)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
