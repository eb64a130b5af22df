"""bf16 autocast runs every net and agrees with fp32; outputs keep the input dtype; building and running a
net is deterministic given a seed."""

from __future__ import annotations

import pytest
import torch

from tests.nets.netkit import latents, pixels, wake_zero_params
from ulcore.nets import build_base_model, build_decoder, build_encoder, build_prior


def run_all(m, nets, bf16: bool, resolution: int = 16) -> dict[str, torch.Tensor]:
    x, z = pixels(m, 1, resolution), latents(m, 1, resolution)
    logsnr = torch.tensor([1.0])
    calls = {
        "encoder": lambda: nets["encoder"](x),
        "prior": lambda: nets["prior"](z, logsnr),
        "decoder": lambda: nets["decoder"](x, logsnr, z),
        "base": lambda: nets["base"](z, logsnr, torch.tensor([3])),
    }
    out = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for name, call in calls.items():
            out[name] = call()
    return out


def build_all(m, seed: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    nets = {"encoder": build_encoder(m), "prior": build_prior(m), "decoder": build_decoder(m),
            "base": build_base_model(m)}
    for net in nets.values():
        net.eval()
        wake_zero_params(net, std=0.05)
    return nets


def test_bf16_autocast_agrees_with_fp32(m):
    nets = build_all(m, seed=0)
    ref, low = run_all(m, nets, bf16=False), run_all(m, nets, bf16=True)
    for name in ref:
        assert low[name].dtype == torch.float32, f"{name} must return its input's dtype under autocast"
        assert torch.isfinite(low[name]).all()
        rel = (low[name] - ref[name]).norm() / ref[name].norm()
        assert ref[name].norm() > 0 and rel < 0.05, f"{name}: bf16 vs fp32 relative error {rel:.3f}"


def test_deterministic_given_seed(m):
    a, b = build_all(m, seed=3), build_all(m, seed=3)
    for name in a:
        for (k, p), q in zip(a[name].state_dict().items(), b[name].state_dict().values()):
            assert torch.equal(p, q), f"{name}.{k} differs between two builds with the same seed"
    out_a, out_b = run_all(m, a, bf16=False), run_all(m, b, bf16=False)
    for name in out_a:
        assert torch.equal(out_a[name], out_b[name])
    c = build_all(m, seed=4)
    assert not torch.equal(a["encoder"].stem.weight, c["encoder"].stem.weight)


@pytest.mark.parametrize("net", ["prior", "decoder"])
def test_state_dict_round_trip(net):
    from tests.nets.netkit import model_config
    m = model_config("tiny")
    a, b = build_all(m, seed=0)[net], build_all(m, seed=1)[net]
    b.load_state_dict(a.state_dict())
    out_a, out_b = run_all(m, {**build_all(m, 2), net: a}, False), run_all(m, {**build_all(m, 2), net: b}, False)
    assert torch.equal(out_a[net], out_b[net])
