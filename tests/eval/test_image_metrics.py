"""PSNR and chroma against their closed forms; SSIM is torchmetrics' documented Gaussian-window SSIM, per image."""

from __future__ import annotations

import math

import pytest
import torch

from ulcore.eval.image_metrics import PSNR_CAP_DB, chroma, psnr, ssim


def test_psnr_closed_form_per_image():
    x = torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)
    y = x.clone()
    y[0] += 10  # MSE 100
    y[1, :, :4] += 20  # half the pixels off by 20: MSE 200
    values = psnr(y, x)
    assert values[0].item() == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-4)
    assert values[1].item() == pytest.approx(10 * math.log10(255**2 / 200), abs=1e-4)
    # the mean over images is not the PSNR of the pooled MSE
    assert values.mean().item() != pytest.approx(10 * math.log10(255**2 / 150), abs=1e-3)


def test_psnr_clips_and_quantises_float_inputs():
    x = torch.zeros(1, 3, 4, 4)  # float 0 -> 127.5 -> 128
    over = torch.full((1, 3, 4, 4), 3.0)  # clipped to 1 -> 255: error 127 on [0, 255]
    assert psnr(over, x).item() == pytest.approx(10 * math.log10(255**2 / 127**2), abs=1e-4)
    assert psnr(x, x).item() == pytest.approx(PSNR_CAP_DB)


def test_psnr_on_clips_counts_frames_as_images():
    x = torch.zeros(2, 3, 4, 8, 8, dtype=torch.uint8)
    assert psnr(x + 5, x).shape == (8,)


def test_ssim_is_torchmetrics_gaussian_11_sigma_1p5():
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 3, 32, 32), generator=g, dtype=torch.uint8)
    noisy = (x.float() + torch.randn(x.shape, generator=g) * 20).clamp(0, 255).round().to(torch.uint8)
    ours = ssim(noisy, x)
    ref = tm_ssim(noisy.float(), x.float(), gaussian_kernel=True, kernel_size=11, sigma=1.5, data_range=255.0,
                  reduction="none")
    assert ours.shape == (3,)
    torch.testing.assert_close(ours, ref.float())
    assert ssim(x, x).min().item() == pytest.approx(1.0, abs=1e-5)
    assert (ours < 0.99).all()


def test_chroma_is_zero_on_grey_and_the_channel_std_on_colour():
    grey = torch.arange(2 * 16, dtype=torch.uint8).reshape(2, 1, 4, 4).expand(2, 3, 4, 4)
    assert chroma(grey).tolist() == [0.0, 0.0]
    x = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    x[0, 2, :2] = 255  # half the pixels (0, 0, 255): population std sqrt(2 * 85² + 170²) / sqrt(3) = 85 sqrt(2)
    assert chroma(x).item() == pytest.approx(0.5 * 85 * math.sqrt(2), rel=1e-6)
    assert chroma(torch.full((1, 3, 2, 2), -1.0)).item() == 0.0  # floats in [-1, 1] like psnr
    assert chroma(torch.zeros(2, 3, 4, 8, 8, dtype=torch.uint8)).shape == (8,)  # clips: one value per frame
