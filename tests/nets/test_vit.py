"""Prior and base model: shapes (images and video), v̂ = 0 at init, label and null-class conditioning, odd
latent grids, and the label contract."""

from __future__ import annotations

import pytest
import torch

from tests.nets.netkit import latents, model_config, wake_zero_params
from ulcore.nets import build_base_model, build_prior


def test_prior_shape_and_zero_init(m):
    prior = build_prior(m)
    z = latents(m, 3)
    v = prior(z, torch.tensor([-15.0, 0.0, 5.0]))
    assert v.shape == z.shape and v.dtype == z.dtype
    assert torch.equal(v, torch.zeros_like(v))  # adaLN-zero + zero output head: v̂ = 0 at init


def test_prior_depends_on_logsnr_and_input(m):
    torch.manual_seed(0)
    prior = build_prior(m)
    wake_zero_params(prior)
    z = latents(m, 2)
    a = prior(z, torch.tensor([0.0, 0.0]))
    assert not torch.allclose(a, prior(z, torch.tensor([3.0, 3.0])))
    assert not torch.allclose(a, prior(z + 0.1, torch.tensor([0.0, 0.0])))


def test_base_model_shape_and_zero_init(m):
    base = build_base_model(m)
    z = latents(m, 2)
    v = base(z, torch.tensor([-5.0, 1.0]), torch.tensor([0, m.num_classes]))
    assert v.shape == z.shape
    assert torch.equal(v, torch.zeros_like(v))


def test_base_model_label_changes_output_and_null_class_works(m):
    torch.manual_seed(0)
    base = build_base_model(m).eval()
    wake_zero_params(base)
    z = latents(m, 1).expand(3, *latents(m, 1).shape[1:])
    logsnr = torch.zeros(3)
    v = base(z, logsnr, torch.tensor([0, 1, m.num_classes]))  # class 0, class 1, null
    assert torch.isfinite(v).all()
    assert not torch.allclose(v[0], v[1])
    assert not torch.allclose(v[0], v[2]) and not torch.allclose(v[1], v[2])
    # the null class is an ordinary embedding row: conditional and unconditional calls batch together
    assert torch.allclose(base(z[:1], logsnr[:1], torch.tensor([m.num_classes])), v[2:], atol=1e-5)


def test_base_model_rejects_bad_labels():
    m = model_config("tiny")
    base = build_base_model(m)
    z = latents(m, 2)
    with pytest.raises(ValueError, match="labels must lie"):
        base(z, torch.zeros(2), torch.tensor([0, m.num_classes + 1]))
    with pytest.raises(ValueError, match="int64"):
        base(z, torch.zeros(2), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("grid", [(5, 7), (1, 1), (6, 4)])
def test_base_model_handles_odd_and_tiny_grids(grid):
    torch.manual_seed(0)
    m = model_config("tiny")
    base = build_base_model(m)
    wake_zero_params(base)
    z = torch.randn(2, m.latent_channels, *grid)
    v = base(z, torch.zeros(2), torch.tensor([1, 2]))
    assert v.shape == z.shape and torch.isfinite(v).all()


def test_base_model_merge_is_local_in_time_for_video():
    # the 2x2 merge is spatial: a perturbation at latent frame 0 reaches frame 1 only through attention,
    # so with the attention output zeroed frames stay independent
    torch.manual_seed(0)
    m = model_config("tiny-video")
    base = build_base_model(m).eval()
    wake_zero_params(base)
    for module in base.modules():
        if module.__class__.__name__ == "Attention":
            torch.nn.init.zeros_(module.proj.weight)
            torch.nn.init.zeros_(module.proj.bias)
    z = latents(m, 1)
    dz = torch.zeros_like(z)
    dz[:, :, 0] = 1.0
    v0, v1 = base(z, torch.zeros(1), torch.tensor([0])), base(z + dz, torch.zeros(1), torch.tensor([0]))
    assert not torch.allclose(v0[:, :, 0], v1[:, :, 0])
    assert torch.allclose(v0[:, :, 1:], v1[:, :, 1:], atol=1e-6)
