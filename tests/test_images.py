"""The one image grid (training monitors, evaluation, `unified-latents sample`) and its PNG files."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ulcore.images import image_grid, paired_grid, png_bytes, save_png


def test_image_grid_layout():
    x = torch.zeros(5, 3, 4, 6, dtype=torch.uint8)
    x[1] = 255
    grid = image_grid(x, columns=3, pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 7 + 1, 3) and grid.dtype == np.uint8
    assert (grid[1:5, 8:14] == 255).all() and (grid[1:5, 1:7] == 0).all()
    clips = torch.zeros(2, 1, 3, 4, 4, dtype=torch.uint8)  # grey clips: one row of 3 frames each
    assert image_grid(clips, pad=0).shape == (8, 12, 3)
    pair = paired_grid(torch.zeros(3, 3, 4, 4, dtype=torch.uint8), torch.full((3, 3, 4, 4), 9, dtype=torch.uint8),
                       columns=2)
    assert pair.shape == (4 * 5 + 1, 2 * 5 + 1, 3)
    assert (pair[6:10, 1:5] == 9).all()  # row 2 = reconstructions of row 1


def test_greyscale_becomes_rgb_with_white_separators_and_floats_are_quantised():
    grey = torch.arange(4 * 2 * 2, dtype=torch.uint8).reshape(4, 1, 2, 2)  # sqrt(4) = 2 columns
    grid = image_grid(grey)
    assert grid.shape == (2 * 3 + 1, 2 * 3 + 1, 3)
    assert (grid[..., 0] == grid[..., 1]).all() and (grid[..., 1] == grid[..., 2]).all()  # no colour from grey
    assert (grid[0] == 255).all() and (grid[:, 3] == 255).all()  # border and separator
    assert (grid[4:6, 4:6, 0] == grey[3, 0].numpy()).all()
    floats = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2)  # [-1, 1] -> [0, 255], clamped
    assert image_grid(floats, pad=0)[..., 0].tolist() == [[0, 128], [255, 255]]
    with pytest.raises(ValueError, match=r"non-empty \(N,C,H,W\)"):
        image_grid(torch.zeros(0, 3, 4, 4, dtype=torch.uint8))


def test_png_round_trip(tmp_path):
    grid = image_grid(torch.randint(0, 256, (3, 3, 5, 7), generator=torch.Generator().manual_seed(0),
                                    dtype=torch.uint8))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(grid)))), grid)
    save_png(grid, tmp_path / "out" / "grid.png")
    assert (tmp_path / "out" / "grid.png").read_bytes() == png_bytes(grid)
