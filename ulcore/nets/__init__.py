"""The four networks of Unified Latents and two accounting helpers.

    build_encoder(m)(x) -> z_clean                      x (B,3,H,W) or (B,3,T,H,W) in [-1, 1]
    build_prior(m)(z_t, logsnr) -> v̂                    logsnr float (B,)
    build_decoder(m)(x_t, logsnr, z0) -> v̂
    build_base_model(m)(z_t, logsnr, labels) -> v̂       labels int64 (B,), m.num_classes = null class

All diffusion nets predict v = α ε − σ x_clean and return the dtype of their first input (fp32 under bf16
autocast too). Modules: `layers` (shared blocks), `encoder`, `vit` (prior and base model), `decoder`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ulcore.config import ModelConfig
from ulcore.nets.decoder import UViTDecoder, build_decoder
from ulcore.nets.encoder import Encoder
from ulcore.nets.layers import set_activation_checkpointing
from ulcore.nets.vit import LatentViT, TwoLevelViT, build_base_model, build_prior


def build_encoder(m: ModelConfig) -> Encoder:
    return Encoder(m)


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (meta-device modules work too: only shapes are read)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def forward_flops(module: nn.Module, *example_inputs: torch.Tensor) -> int:
    """FLOPs of one forward pass on these inputs (torch.utils.flop_counter: 2 per multiply-add; matmuls,
    convolutions and attention only). The backward pass costs about twice this, so a training step ≈ 3×."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(*example_inputs)
    return int(counter.get_total_flops())


__all__ = ["build_encoder", "build_prior", "build_decoder", "build_base_model", "count_params", "forward_flops",
           "set_activation_checkpointing", "Encoder", "LatentViT", "TwoLevelViT", "UViTDecoder"]
