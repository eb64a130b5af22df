"""Building blocks shared by the encoder, prior, decoder and base model.

Every block is written once for images and video: `dims` = 2 means tensors (B, C, H, W), `dims` = 3 means
(B, C, T, H, W). Convolutions keep time and space separate in their kernel sizes so that a 2D net and its
video twin are the same code. Transformers see a grid flattened to tokens (B, N, D) with N = (T·)h·w.

Noise level conditioning is an embedding of the log-SNR λ (docs/method.md §10,
D8): Fourier features of λ / 20, so that the whole range λ ∈ [-20, 20] used by every schedule maps to
[-1, 1], followed by an MLP; the result drives FiLM in conv blocks and adaLN-zero in transformer blocks.
All ops are autocast friendly (linear, conv, scaled_dot_product_attention in bf16; norms in fp32).

Residual and transformer blocks are `RecomputableBlock`s: with activation checkpointing on
(`set_activation_checkpointing`, the stage's `activation_checkpointing` flag) a block keeps only its inputs during
the forward pass and recomputes its activations in the backward pass — the same loss and gradients, less memory.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

CPU_MATH_ATTENTION_TOKENS = 1024  # CPU training: sequences up to this length use SDPA's math backend (faster backward)
LOGSNR_SCALE = 20.0  # λ / LOGSNR_SCALE ∈ [-1, 1] for every schedule (config.LOGSNR_LIMIT)


def group_count(channels: int, max_groups: int) -> int:
    """Largest divisor of `channels` that is ≤ max_groups (GroupNorm needs groups | channels)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def conv(dims: int, c_in: int, c_out: int, kernel: int = 3, stride: Sequence[int] | int = 1,
         temporal_kernel: int | None = None) -> nn.Module:
    """A 'same' convolution in 2 or 3 dimensions; `stride` may differ per axis (time vs space). In 3 dimensions
    `temporal_kernel` (default: `kernel`) is the kernel's extent along time: 1 makes it a per-frame convolution."""
    if dims == 2:
        return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2)
    t = kernel if temporal_kernel is None else temporal_kernel
    return nn.Conv3d(c_in, c_out, (t, kernel, kernel), stride=stride, padding=(t // 2, kernel // 2, kernel // 2))


def zero_(module: nn.Module) -> nn.Module:
    """Zero every parameter: residual branches and output heads start as the identity / zero (adaLN-zero)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# ------------------------------------------------------------------------------------------------ patching
def space_to_depth(x: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """(B, C, *S) -> (B, C·∏f, *S/f): fold each f-block of the grid into channels (UL §5.1 2×2 patching)."""
    b, c, *size = x.shape
    shape = [b, c]
    for s, f in zip(size, factors):
        if s % f:
            raise ValueError(f"grid size {tuple(size)} is not divisible by the patch factors {tuple(factors)}")
        shape += [s // f, f]
    x = x.reshape(shape)
    n = len(size)
    # (B, C, s0, f0, s1, f1, ...) -> (B, C, f0, f1, ..., s0, s1, ...)
    x = x.permute(0, 1, *[3 + 2 * i for i in range(n)], *[2 + 2 * i for i in range(n)])
    return x.reshape(b, c * math.prod(factors), *[s // f for s, f in zip(size, factors)])


def depth_to_space(x: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Inverse of `space_to_depth`: (B, C·∏f, *S) -> (B, C, *S·f)."""
    b, cf, *size = x.shape
    n = len(size)
    c = cf // math.prod(factors)
    x = x.reshape(b, c, *factors, *size)
    # (B, C, f0, f1, ..., s0, s1, ...) -> (B, C, s0, f0, s1, f1, ...)
    order = [0, 1]
    for i in range(n):
        order += [2 + n + i, 2 + i]
    x = x.permute(order)
    return x.reshape(b, c, *[s * f for s, f in zip(size, factors)])


def resize_nearest(z: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of a (B, C, *grid) tensor to `size`; a no-op when the grid already matches."""
    if tuple(z.shape[2:]) == tuple(size):
        return z
    return F.interpolate(z, size=tuple(size), mode="nearest")


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, D, *grid) -> (B, N, D)."""
    return x.flatten(2).transpose(1, 2)


def tokens_to_grid(x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(B, N, D) -> (B, D, *grid)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)


# ------------------------------------------------------------------------------------- noise and position
class NoiseEmbedding(nn.Module):
    """λ -> conditioning vector: Fourier features of λ/20 (frequencies 1..1000, geometric) and λ/20 itself,
    then Linear-SiLU-Linear. Frequencies span the whole range: the lowest is monotone over [-1, 1]; the highest
    resolves Δλ ≈ 0.02."""

    def __init__(self, dim: int, num_freqs: int = 64):
        super().__init__()
        freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), num_freqs))
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * num_freqs + 1, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, logsnr: torch.Tensor) -> torch.Tensor:
        u = (logsnr.float() / LOGSNR_SCALE)[:, None]
        phase = u * self.freqs[None]
        return self.mlp(torch.cat([u, torch.sin(phase), torch.cos(phase)], dim=1))


def sincos_position(grid: Sequence[int], dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed N-D sin-cos position embedding (N, dim) for a grid (T,) h, w: each axis gets an equal even share
    of the channels (frequencies 1/10000^(k/K) as in ViT/MAE); leftover channels stay zero. Any grid size works,
    so one net handles several resolutions."""
    per_axis = (dim // (2 * len(grid))) * 2
    if per_axis == 0:
        raise ValueError(f"width {dim} is too small for a {len(grid)}-axis position embedding")
    half = per_axis // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64, device=device) / half)
    coords = torch.meshgrid(*[torch.arange(s, dtype=torch.float64, device=device) for s in grid], indexing="ij")
    parts = []
    for c in coords:
        angle = c.reshape(-1, 1) * omega[None]
        parts += [torch.sin(angle), torch.cos(angle)]
    emb = torch.cat(parts, dim=1)
    if emb.shape[1] < dim:
        emb = F.pad(emb, (0, dim - emb.shape[1]))
    return emb.float()


class PositionCache(nn.Module):
    """Memoises `sincos_position` per (grid, device); not part of the state dict."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self._cache: dict[tuple, torch.Tensor] = {}

    def forward(self, grid: Sequence[int], device: torch.device) -> torch.Tensor:
        key = (tuple(grid), str(device))
        if key not in self._cache:
            self._cache[key] = sincos_position(grid, self.dim, device=device)
        return self._cache[key]


# ------------------------------------------------------------------------------ activation checkpointing
class RecomputableBlock(nn.Module):
    """A block whose activations can be recomputed in the backward pass instead of stored. Subclasses implement
    `block`; `recompute` applies only in training mode with grad enabled (eval and sampling take the plain path).
    Non-reentrant checkpointing replays the forward pass's RNG (dropout) and autocast state, so the recomputed
    activations, hence the gradients, are those of the plain path."""

    recompute = False

    def block(self, *args: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, *args: torch.Tensor | None) -> torch.Tensor:
        if self.recompute and self.training and torch.is_grad_enabled():
            return checkpoint(self.block, *args, use_reentrant=False)
        return self.block(*args)


def set_activation_checkpointing(module: nn.Module, enabled: bool) -> int:
    """Turn recomputation on or off for every residual and transformer block under `module`; returns how many."""
    blocks = [b for b in module.modules() if isinstance(b, RecomputableBlock)]
    for b in blocks:
        b.recompute = enabled
    return len(blocks)


# ------------------------------------------------------------------------------------------ conv blocks
class ResBlock(RecomputableBlock):
    """Pre-activation residual block GN-SiLU-conv, [FiLM from the noise embedding], GN-SiLU-dropout-conv; each GN
    has at most `norm_groups` groups (`model.norm_groups`).

    With `cond_dim` the second norm is modulated h·(1 + scale) + shift (FiLM, zero-initialised) and the last
    conv is zero-initialised so the block starts as the identity (diffusion nets). Without it (the encoder)
    everything keeps PyTorch's default init.
    """

    def __init__(self, dims: int, c_in: int, c_out: int, cond_dim: int = 0, dropout: float = 0.0,
                 temporal_kernel: int = 3, *, norm_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(group_count(c_in, norm_groups), c_in)
        self.conv1 = conv(dims, c_in, c_out, temporal_kernel=temporal_kernel)
        self.norm2 = nn.GroupNorm(group_count(c_out, norm_groups), c_out, affine=cond_dim == 0)
        self.film = zero_(nn.Linear(cond_dim, 2 * c_out)) if cond_dim else None
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(dims, c_out, c_out, temporal_kernel=temporal_kernel)
        if cond_dim:
            zero_(self.conv2)
        self.skip = conv(dims, c_in, c_out, kernel=1) if c_in != c_out else nn.Identity()

    def block(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.film is not None:
            scale, shift = self.film(F.silu(cond)).chunk(2, dim=1)
            expand = (slice(None), slice(None)) + (None,) * (h.ndim - 2)
            h = h * (1 + scale[expand]) + shift[expand]
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Strided 3×3(×3) conv; `factors` per axis, e.g. (2, 2) for images, (1, 2, 2) or (2, 2, 2) for video. Along
    time the kernel is `temporal_kernel` wide, but at least 3 where time is downsampled (so no frame is skipped)."""

    def __init__(self, dims: int, c_in: int, c_out: int, factors: Sequence[int], temporal_kernel: int = 3):
        super().__init__()
        t = max(temporal_kernel, 3) if dims == 3 and factors[0] > 1 else temporal_kernel
        self.conv = conv(dims, c_in, c_out, stride=tuple(factors), temporal_kernel=t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest upsampling by `factors` per axis, then a 3×3(×`temporal_kernel`) conv."""

    def __init__(self, dims: int, c_in: int, c_out: int, factors: Sequence[int], temporal_kernel: int = 3):
        super().__init__()
        self.factors = tuple(factors)
        self.conv = conv(dims, c_in, c_out, temporal_kernel=temporal_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = [s * f for s, f in zip(x.shape[2:], self.factors)]
        return self.conv(resize_nearest(x, size))


# ------------------------------------------------------------------------------------------ transformers
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x·(1 + scale) + shift, with per-example (B, D) modulation broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention (flash / memory-efficient kernels on
    GPU, the fused bf16 kernel on CPU). q and k are RMS-normalised per head (QK-norm) for stable large widths."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # QK-norm in fp32 (bf16 inputs with fp32 weights would miss the fused kernel), then back to v's dtype
        q = F.rms_norm(q.float(), self.q_norm.normalized_shape, self.q_norm.weight, self.q_norm.eps).to(v.dtype)
        k = F.rms_norm(k.float(), self.k_norm.normalized_shape, self.k_norm.weight, self.k_norm.eps).to(v.dtype)
        if x.device.type == "cpu" and n <= CPU_MATH_ATTENTION_TOKENS and torch.is_grad_enabled():
            # measured on an AMX Xeon (tiny preset, bf16): the fused CPU flash kernel's backward is ~30 ms per call
            # at 64 tokens, the math backend a fraction of that; long sequences keep the fused kernel (memory).
            # Without gradients (sampling) the fused kernel is faster: generating 100 tiny samples (32 + 32
            # steps) took 10.0-10.8 s with it vs 11.6 s with the math backend, same samples to 1e-6.
            with sdpa_kernel(SDPBackend.MATH):
                out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.dropout(self.proj(out.transpose(1, 2).reshape(b, n, d)))


class TransformerBlock(RecomputableBlock):
    """DiT block with adaLN-zero: the conditioning vector sets shift/scale/gate of both sub-layers, gates start
    at zero so every block starts as the identity."""

    def __init__(self, dim: int, heads: int, cond_dim: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim), nn.Dropout(dropout))
        self.ada = zero_(nn.Linear(cond_dim, 6 * dim))

    def block(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(cond)).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a zero-initialised projection: the net's prediction starts at exactly 0."""

    def __init__(self, dim: int, cond_dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = zero_(nn.Linear(cond_dim, 2 * dim))
        self.proj = zero_(nn.Linear(dim, out_dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(F.silu(cond)).chunk(2, dim=1)
        return self.proj(modulate(self.norm(x), shift, scale))


def check_input(x: torch.Tensor, dims: int, channels: int, name: str) -> None:
    """Shape contract at each net's edge: (B, C, H, W) for images, (B, C, T, H, W) for video."""
    if x.ndim != dims + 2 or x.shape[1] != channels:
        layout = "(B, C, H, W)" if dims == 2 else "(B, C, T, H, W)"
        raise ValueError(f"{name}: expected {layout} with C = {channels}, got shape {tuple(x.shape)}")
