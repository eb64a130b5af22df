"""Image grids for MLflow and sample folders."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image


def grid(images: torch.Tensor, columns: int | None = None) -> np.ndarray:
    """uint8 (N,C,H,W) images, or (N,C,T,H,W) clips (one clip per row), -> one HWC uint8 grid."""
    if images.ndim == 5:  # clips: frames side by side, one clip per row
        n, c, t, h, w = images.shape
        return grid(images.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w), columns=t)
    n, c, h, w = images.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = torch.zeros((c, rows * (h + 1) + 1, cols * (w + 1) + 1), dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        canvas[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + k * (w + 1): 1 + k * (w + 1) + w] = images[i]
    array = canvas.permute(1, 2, 0).numpy()
    return array[..., 0] if c == 1 else array


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
