"""FVD: unavailable (with the reason) without weights; computes with stand-in weight files passed explicitly."""

from __future__ import annotations

import math

import pytest
import torch

from ulcore.eval.fvd import fvd
from ulcore.eval.i3d import I3DFeatures, I3DUnavailable
from ulcore.eval.i3d_net import InceptionI3d


def _clips(n: int, seed: int, frames: int = 8, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, frames, size, size), generator=g, dtype=torch.uint8)


def test_fvd_unavailable_without_weights(tmp_path):
    clips = _clips(2, 0)
    value, info = fvd(clips, clips, "")
    assert value is None and "i3d_weights is empty" in info["fvd_unavailable_reason"]
    value, info = fvd(clips, clips, str(tmp_path / "i3d_pretrained_400.pt"))
    assert value is None and "no such file" in info["fvd_unavailable_reason"]
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    value, info = fvd(clips, clips, str(junk))
    assert value is None and "could not load" in info["fvd_unavailable_reason"]
    with pytest.raises(I3DUnavailable):
        I3DFeatures("")


def test_i3d_state_dict_layout_matches_the_published_file_names():
    keys = InceptionI3d().state_dict().keys()
    for key in ("Conv3d_1a_7x7.conv3d.weight", "Conv3d_1a_7x7.bn.running_var", "Mixed_3b.b1b.conv3d.weight",
                "Mixed_5c.b3b.bn.bias", "logits.conv3d.weight", "logits.conv3d.bias"):
        assert key in keys
    assert InceptionI3d().state_dict()["logits.conv3d.weight"].shape == (400, 1024, 1, 1, 1)


def test_fvd_computes_with_a_stand_in_state_dict(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "i3d_pretrained_400.pt"
    torch.save(InceptionI3d().state_dict(), path)  # random weights: the number means nothing, the path works
    real, fake = _clips(2, 1), _clips(2, 2)
    value, info = fvd(real, fake, str(path), batch_size=4)
    assert value is not None and math.isfinite(value) and value > 0
    assert info["i3d_format"] == "state_dict" and info["fvd_frames"] == 16 and len(info["i3d_sha256"]) == 64


class _ScriptedStandIn(torch.nn.Module):
    """Has the call signature of StyleGAN-V's i3d_torchscript.pt."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        assert not rescale and not resize and return_features
        return torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4))], dim=1)


def test_fvd_computes_with_a_stand_in_torchscript(tmp_path):
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(_ScriptedStandIn()), str(path))
    net = I3DFeatures(str(path))
    assert net.kind == "torchscript"
    x = net.prepare(_clips(3, 3, frames=4, size=20))
    assert x.shape == (3, 3, 16, 224, 224) and -1.0 <= x.min() and x.max() <= 1.0
    real, fake = _clips(4, 4), (_clips(4, 5).float() * 0.5).to(torch.uint8)
    value, _ = fvd(real, fake, str(path))
    same, _ = fvd(real, real, str(path))
    assert same == pytest.approx(0.0, abs=1e-6) and value > same
