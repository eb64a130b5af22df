"""The Kinetics-600 FVD protocol at smoke scale: condition on real frames, generate the rest (tiny-video nets).

tiny-video clips have 8 frames and 2 frames per latent frame; its preset conditions on 3 frames, so latent frame 0
is replaced in the base model and pixel frames 0-2 in the decoder (the Kinetics 5 = 4 + 1 structure).
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.eval.test_fvd import _ScriptedStandIn
from tests.train.smoke import NETS
from ulcore.config import ConfigError, load_config
from ulcore.diffusion.sampling import context_latents, generate


def _cfg(tmp_path, *extra: str):
    params = tmp_path / "params.yaml"
    params.write_text("preset: tiny-video\n")
    return load_config(params, [f"storage.root={tmp_path / 'root'}", *NETS, *extra])


def _nets(cfg) -> dict[str, torch.nn.Module]:
    """Tiny nets with every weight perturbed: the zero-initialised output layers would make v̂ = 0 everywhere."""
    from ulcore.nets import build_base_model, build_decoder, build_encoder, build_prior

    gen = torch.Generator().manual_seed(0)
    nets = {"encoder": build_encoder(cfg.model), "decoder": build_decoder(cfg.model), "prior": build_prior(cfg.model),
            "base": build_base_model(cfg.model)}
    with torch.no_grad():
        for net in nets.values():
            for p in net.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return {name: net.eval() for name, net in nets.items()}


def _clips(n: int, seed: int, frames: int = 8, size: int = 32) -> torch.Tensor:
    """uint8 (n, 3, T, H, W): a bright square moving right on a noisy background."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 60, (n, 3, frames, size, size), generator=g, dtype=torch.uint8)
    for i in range(n):
        top = int(torch.randint(0, size - 8, (1,), generator=g))
        for t in range(frames):
            left = (3 * t + 5 * i) % (size - 8)
            x[i, :, t, top:top + 8, left:left + 8] = 220
    return x


def test_fvd_context_frames_is_validated(tmp_path):
    assert _cfg(tmp_path).eval.fvd_context_frames == 3
    assert load_config(None, []).eval.fvd_context_frames == 0
    with pytest.raises(ConfigError, match="eval.fvd_context_frames"):
        _cfg(tmp_path, "eval.fvd_context_frames=8")  # no frame left to generate
    with pytest.raises(ConfigError, match="model.temporal_downsample = 2"):
        _cfg(tmp_path, "eval.fvd_context_frames=1")  # fills no latent frame
    with pytest.raises(ConfigError, match="eval.fvd_context_frames"):
        load_config(None, ["eval.fvd_context_frames=1"])  # images: nothing to condition on
    with pytest.raises(ConfigError, match="eval.fvd_reconstruction_guidance"):
        _cfg(tmp_path, "eval.fvd_reconstruction_guidance=-1")


def test_context_latents_are_the_whole_latent_frames_and_see_no_later_frame(tmp_path):
    from ulcore.data.loaders import to_float

    cfg = _cfg(tmp_path)
    encoder = _nets(cfg)["encoder"]
    clip = to_float(_clips(2, 0))
    with torch.no_grad():
        z_ctx = context_latents(encoder, clip[:, :, :3], cfg.model)  # 3 frames, k = 2: latent frame 0 only
        h = cfg.data.resolution // cfg.model.downsample
        assert z_ctx.shape == (2, cfg.model.latent_channels, 1, h, h)
        # the encoder is not causal: a change in the last frame reaches latent frame 0 of the full clip ...
        changed = clip.clone()
        changed[:, :, 7] = -changed[:, :, 7]
        assert not torch.allclose(encoder(changed)[:, :, 0], encoder(clip)[:, :, 0])
        # ... so the context is held on its last frame: for a clip that holds still after the context,
        # the conditioning is exactly the clip's own latent frame
        still = torch.cat([clip[:, :, :3], clip[:, :, 2:3].expand(-1, -1, 5, -1, -1)], dim=2)
        torch.testing.assert_close(z_ctx, encoder(still)[:, :, :1])


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_generate_keeps_the_real_context_frames_per_sample_and_per_seed(tmp_path, guidance):
    from ulcore.data.loaders import to_float, to_uint8

    cfg = _cfg(tmp_path)
    nets = _nets(cfg)
    stage1 = SimpleNamespace(encoder=nets["encoder"], decoder=nets["decoder"], config=cfg)
    stage2 = SimpleNamespace(base=nets["base"], config=cfg)
    real = _clips(4, 1)
    context = to_float(real[:, :, :3])
    labels = torch.full((4,), cfg.model.num_classes, dtype=torch.int64)

    def predict(rows, seed=7, ctx=context):
        return generate(stage1, stage2, labels[rows], seed=seed, base_steps=3, decoder_steps=3, indices=rows,
                        context=ctx[rows], reconstruction_guidance=guidance)

    out = predict([0, 1, 2, 3])
    assert torch.equal(out[:, :, :3], context)  # the decoder's replacement ends on the real frames themselves
    assert torch.equal(to_uint8(out)[:, :, :3], real[:, :, :3])  # and they round-trip to the stored uint8 pixels
    torch.testing.assert_close(predict([2, 3]), out[2:])  # a sample does not depend on its batch
    torch.testing.assert_close(predict([0, 1, 2, 3]), out)  # nor on anything but its seed
    assert not torch.allclose(predict([0, 1, 2, 3], seed=8)[:, :, 3:], out[:, :, 3:])
    other = context.flip(0)  # the same noise, other contexts: the generated frames follow the context
    assert not torch.allclose(predict([0, 1, 2, 3], ctx=other)[:, :, 3:], out[:, :, 3:])


def _write_clip_shards(cfg, clips: dict[str, torch.Tensor]) -> None:
    from ulcore import storage
    from ulcore.data.shards import write_shard

    def samples(split, x):
        for i, clip in enumerate(x.numpy()):
            buf = io.BytesIO()
            np.save(buf, clip.transpose(1, 2, 3, 0))  # (T, H, W, 3), as the Kinetics sharder stores clips
            yield {"__key__": f"{split}_{i:05d}", "npy": buf.getvalue(), "cls": i % cfg.model.num_classes}

    for split, x in clips.items():
        write_shard(storage.join(cfg.storage.root, "data", "shards", split, f"{split}-000000.tar"), samples(split, x))


@pytest.mark.slow
def test_evaluate_reports_fvd_as_frame_prediction_with_the_real_context_frames(tmp_path, monkeypatch):
    from ulcore.eval.evaluate import run_evaluate
    from ulcore.models import export_modules, stage1_root, stage2_root

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("UL_PARENT_RUN_ID", raising=False)
    i3d = tmp_path / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(_ScriptedStandIn()), str(i3d))  # a stand-in: the number means nothing
    cfg = _cfg(tmp_path, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"eval.i3d_weights={i3d}",
               "eval.num_samples=5", "eval.batch_size=2", "eval.base_steps=2",
               "eval.decoder_steps=2", "eval.grid_size=8")
    val = _clips(3, 3)  # fewer held-out clips than samples: sample i continues clip i mod 3
    _write_clip_shards(cfg, {"train": _clips(6, 2), "val": val})
    nets = _nets(cfg)
    export_modules({k: nets[k] for k in ("encoder", "decoder", "prior")}, cfg, stage1_root(cfg))
    export_modules({"base": nets["base"]}, cfg, stage2_root(cfg))

    result = run_evaluate(cfg)

    assert isinstance(result["fvd"], float) and np.isfinite(result["fvd"]) and result["fvd_unavailable_reason"] is None
    p = result["protocol"]["fvd"]
    assert (p["context_frames"], p["generated_frames"], p["frames"], p["context_included"]) == (3, 5, 8, True)
    assert (p["context_latent_frames"], p["context_pixel_only_frames"]) == (1, 1)
    assert p["conditioning"].startswith("replacement") and p["reconstruction_guidance"] == 0.0
    assert p["reference"].startswith("val clips") and p["format"] == "torchscript"
    assert "3 real + 5 generated frames" in result["markdown"] and "context included" in result["markdown"]
    with np.load(tmp_path / "root" / "outputs" / "predictions.npz") as saved:
        real, predicted = saved["real"], saved["predicted"]
        assert int(saved["context_frames"]) == 3
    expected = val.numpy()[[0, 1, 2, 0, 1]]
    assert predicted.shape == real.shape == expected.shape and np.array_equal(real, expected)
    # the first 3 frames of every prediction are the real frames, bit for bit (replacement ends on them, uint8
    # round-trips through [-1, 1]); the others are generated, so clip 0's two samples differ only there
    assert np.array_equal(predicted[:, :, :3], expected[:, :, :3])
    assert not np.array_equal(predicted[0, :, 3:], predicted[3, :, 3:])
    assert (tmp_path / "root" / "outputs" / "predictions.png").is_file()
