"""The paper-scale presets build the paper's latent grid: every net of each preset, shapes only, on the meta
device (no weights allocated, no GPU), against the numbers UL gives, so a preset cannot drift from them."""

from __future__ import annotations

import pytest
import torch

from ulcore.config import load_config
from ulcore.diffusion.sampling import image_shape, latent_shape
from ulcore.nets import build_base_model, build_decoder, build_encoder, build_prior

# preset -> (pixels C[,T],H,W ; latent grid [T',]h,w ; downsampling per axis), from the paper's text:
PAPER = {
    "imagenet512": ((3, 512, 512), (32, 32), (16, 16)),  # UL §5.1: ImageNet-512, 16x downsampling, 32x32 latents
    "kinetics600": ((3, 16, 128, 128), (4, 16, 16), (4, 8, 8)),  # UL §5.7: 16x128² clips, 4x time, 8x space
}


@pytest.mark.parametrize("preset", sorted(PAPER))
def test_paper_preset_latent_grid(preset, tmp_path):
    pixels, grid, factors = PAPER[preset]
    (tmp_path / "params.yaml").write_text(f"preset: {preset}\ndata: {{root: /raw}}\n")
    cfg = load_config(tmp_path / "params.yaml")
    m = cfg.model
    assert image_shape(cfg) == pixels and latent_shape(cfg) == (m.latent_channels, *grid)
    with torch.device("meta"):
        encoder, prior, decoder, base = build_encoder(m), build_prior(m), build_decoder(m), build_base_model(m)
        x = torch.empty(2, *pixels)
        logsnr, labels = torch.zeros(2), torch.zeros(2, dtype=torch.long)
        z = encoder(x)
        assert encoder.factors == factors
        assert z.shape == (2, m.latent_channels, *grid)
        assert prior(z, logsnr).shape == z.shape  # stage-1 prior on the latent grid
        assert decoder(x, logsnr, z).shape == x.shape  # the decoder takes this grid as z_0
        assert base(z, logsnr, labels).shape == z.shape  # the stage-2 base model too
