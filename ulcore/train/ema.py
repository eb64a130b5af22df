"""Exponential moving average of weights, as its own object (edm2-style half-life in samples)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """EMA copy of a module, initialised equal to it. β = 0.5^(batch / half-life): batch-size independent."""

    def __init__(self, model: nn.Module, halflife_samples: int) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.halflife_samples = halflife_samples

    @torch.no_grad()
    def update(self, model: nn.Module, batch_samples: int) -> None:
        beta = 0.5 ** (batch_samples / self.halflife_samples)
        ema_params, params = list(self.module.parameters()), list(model.parameters())
        if len(ema_params) != len(params):
            raise ValueError(f"EMA holds {len(ema_params)} parameters, the model {len(params)}")
        # one fused call for all of them: 0.35 ms instead of 2.5 ms a step on the tiny preset's 168 tensors (CPU)
        torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - beta)
        for ema_b, b in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
