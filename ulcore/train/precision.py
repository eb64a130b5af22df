"""Hardware choices: which device a driver-side pass runs on, and bf16 autocast where the hardware runs it fast
(fp32 elsewhere)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


def cpu_has_fast_bf16() -> bool:
    """True when the CPU advertises AMX-BF16 or AVX512-BF16; without them bf16 matmuls are emulated and slow
    (measured ~60x slower than fp32 on an AVX2-only EPYC)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def compute_device(cfg) -> torch.device:
    """Where a driver-side pass (encode tasks, evaluation) runs: the first CUDA device when `ray.use_gpu` is set
    and one is visible, else the CPU."""
    return torch.device("cuda" if cfg.ray.use_gpu and torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 on CUDA and on CPUs with AMX / AVX512-bf16, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast context for the forward pass; a no-op in fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
