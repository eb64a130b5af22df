"""Image grids and PNG files: what the training monitors, the evaluation and `unified-latents sample` show.

One grid for every caller: uint8 RGB (greyscale repeated to 3 channels), one-pixel white separators, clips as one
row of frames each. Float inputs in [-1, 1] are quantised as a saved PNG would be.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def image_grid(images: torch.Tensor | np.ndarray, *, columns: int | None = None, pad: int = 1) -> np.ndarray:
    """uint8 (N,C,H,W) images, or (N,C,T,H,W) clips (one row of frames per clip) -> uint8 (H', W', 3) grid."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        x = ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if x.ndim == 5:
        n, c, t = x.shape[:3]
        columns = t
        x = x.permute(0, 2, 1, 3, 4).reshape(n * t, c, x.shape[3], x.shape[4])
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N,C,H,W) batch, got shape {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, _, h, w = x.shape
    columns = columns or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / columns))
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, dtype=np.uint8)
    arr = x.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, col = divmod(i, columns)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = arr[i]
    return grid


def paired_grid(originals: torch.Tensor, reconstructions: torch.Tensor, *, columns: int = 8) -> np.ndarray:
    """Originals and reconstructions interleaved row by row: row 2k = originals, row 2k+1 = their reconstructions."""
    n = min(originals.shape[0], reconstructions.shape[0])
    pieces = []
    for start in range(0, n, columns):
        pieces += [originals[start:start + columns], reconstructions[start:start + columns]]
        if pieces[-1].shape[0] < columns:  # pad short rows so the pairs stay aligned
            fill = torch.full((columns - pieces[-1].shape[0], *originals.shape[1:]), 255, dtype=torch.uint8)
            pieces[-2] = torch.cat([pieces[-2], fill])
            pieces[-1] = torch.cat([pieces[-1], fill])
    if originals.ndim == 5:  # clips: first frames only, so the grid stays 2-D
        pieces = [p[:, :, 0] for p in pieces]
    return image_grid(torch.cat(pieces), columns=columns)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(array: np.ndarray, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(png_bytes(array))


__all__ = ["image_grid", "paired_grid", "png_bytes", "save_png"]
