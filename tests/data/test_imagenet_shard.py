"""ImageNet-layout sharding: conversions, rejects by reason, tar/webdataset readability, reruns, S3."""

from __future__ import annotations

import os
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from shard_fixtures import IMAGE_RES, image_cfg, upload_tree
from ulcore import storage
from ulcore.data import imagenet, loaders
from ulcore.data.sharding import run_shard


def test_center_crop_is_adm_style():
    # 100x50 ramp: one box-halving (short side 50 >= 24, then 25 >= 24: twice -> 25x12), bicubic to short side 12
    img = Image.fromarray(np.tile(np.arange(100, dtype=np.uint8), (50, 1)), "L").convert("RGB")
    out = imagenet.center_crop(img, 12)
    assert out.shape == (12, 12, 3)
    # the central square of a horizontal ramp: columns increase, centred on the ramp's midpoint
    row = out[6, :, 0].astype(int)
    assert np.all(np.diff(row) > 0) and abs(row.mean() - 49.5) < 3


def test_to_rgb_modes():
    assert imagenet.to_rgb(Image.new("CMYK", (4, 4), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    assert imagenet.to_rgb(Image.new("LA", (4, 4), (0, 0))).getpixel((0, 0)) == (255, 255, 255)  # alpha over white
    assert imagenet.to_rgb(Image.new("I;16", (4, 4), 65535)).getpixel((0, 0)) == (255, 255, 255)


@pytest.fixture(scope="module")
def local_run(ray_session, imagenet_tree, tmp_path_factory):
    raw, expected = imagenet_tree
    out = tmp_path_factory.mktemp("out")
    cfg = image_cfg(str(raw), str(out))
    return cfg, run_shard(cfg), expected, out


def test_counts_and_reasons(local_run):
    cfg, summary, expected, out = local_run
    for split in ("train", "val"):
        s = summary["splits"][split]
        assert s["samples"] == expected[split]["samples"]
        assert s["rejected_by_reason"] == expected[split]["reasons"]
        assert s["ignored"] == expected[split]["ignored"] and s["capped"] == 0
    assert summary["splits"]["train"]["per_class"] == {"0": 6, "1": 3}
    assert [c["name"] for c in summary["classes"]] == ["first class", "second, with comma"]
    by_path = {os.path.basename(r["path"]): r["reason"] for r in summary["rejected"]}
    assert by_path["n00000001_trunc.JPEG"] == "truncated"
    assert by_path["n00000001_empty.JPEG"] == "empty"
    assert by_path["n00000002_notes.txt"] == "unknown_extension"
    assert by_path["ILSVRC2012_val_00000099.JPEG"] == "missing"
    assert by_path["ILSVRC2012_val_00000050.JPEG"] == "unlabelled"
    assert storage.read_json(str(out / "data/shards/summary.json"))["splits"] == summary["splits"]
    umask = os.umask(0o022)
    os.umask(umask)
    for path in (out / "data" / "shards" / "train").iterdir():  # written by Ray tasks: no owner-only files
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_shards_readable_by_tarfile_and_webdataset(local_run):
    cfg, summary, expected, out = local_run
    tars = sorted((out / "data/shards/train").glob("*.tar"))
    assert [t.name for t in tars] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    names = []
    for t in tars:
        with tarfile.open(t) as tf:
            names += tf.getnames()
    assert len(names) == 3 * 9 and {n.split(".", 1)[1] for n in names} == {"png", "cls", "json"}
    samples = {s["__key__"]: s for s in wds.WebDataset([str(t) for t in tars], shardshuffle=False).decode("rgb8")}
    assert len(samples) == 9
    for s in samples.values():
        assert s["png"].shape == (IMAGE_RES, IMAGE_RES, 3) and s["png"].dtype == np.uint8
    red = samples["n00000001_cmyk"]["png"].reshape(-1, 3).mean(0)
    assert red[0] > 230 and red[1] < 25 and red[2] < 25  # CMYK JPEG -> RGB red
    grey = samples["n00000001_grey"]["png"].astype(int)
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    png = samples["n00000001_png"]
    assert png["json"]["format"] == "PNG" and png["cls"] == 0
    assert tuple(png["png"][0, 0]) == (0, 0, 255)
    assert samples["n00000002_0"]["json"] == {"format": "JPEG", "mode": "RGB", "size": [37, 50],
                                              "source": "train/n00000002/n00000002_0.JPEG", "synset": "n00000002"}


def test_rerun_skips_done_shards(local_run):
    cfg, summary, expected, out = local_run
    tar = out / "data/shards/train/train-000000.tar"
    before = (tar.stat().st_mtime_ns, tar.read_bytes())
    again = run_shard(cfg)
    assert again["run"]["shards_skipped"] == 4 and again["run"]["shards_built"] == 0
    assert again["splits"] == summary["splits"]
    assert (tar.stat().st_mtime_ns, tar.read_bytes()) == before


def test_changed_params_rebuild_and_prune(local_run, tmp_path):
    cfg, summary, expected, out = local_run
    raw = cfg.data.root
    fresh = image_cfg(raw, str(tmp_path), "shard.samples_per_shard=2")
    first = run_shard(fresh)
    assert first["splits"]["train"]["shards"] == 6  # 11 listed files (2 rejected inside their shards) / 2
    second = run_shard(image_cfg(raw, str(tmp_path), "shard.samples_per_shard=4", "shard.image_format=webp"))
    assert second["run"]["shards_built"] == 4
    assert sorted(p.name for p in (tmp_path / "data/shards/train").glob("*.tar")) == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar"]  # indices 3-5 were removed
    uris = loaders.shard_uris(fresh, "images", "train")
    assert [os.path.basename(u) for u in uris] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    batch = next(loaders.eval_batches(uris, batch_size=9, kind="images"))
    assert batch["x"].shape == (9, 3, IMAGE_RES, IMAGE_RES)


@pytest.mark.slow
def test_s3_source_and_output(ray_session, imagenet_tree, local_run, s3_bucket):
    raw, expected = imagenet_tree
    upload_tree(raw, s3_bucket + "/raw/imagenet")
    cfg = image_cfg(s3_bucket + "/raw/imagenet", s3_bucket + "/run")
    summary = run_shard(cfg)

    def counts(splits):  # the index's inputs digests name where the inputs live (S3 URIs and ETags here)
        return {split: {k: v for k, v in s.items() if k != "index"} for split, s in splits.items()}

    assert counts(summary["splits"]) == counts(local_run[1]["splits"])
    assert [e["samples"] for e in summary["splits"]["train"]["index"]] == [
        e["samples"] for e in local_run[1]["splits"]["train"]["index"]]
    assert storage.exists(s3_bucket + "/run/data/shards/summary.json")
    uris = loaders.shard_uris(cfg, "images", "train")
    assert all(u.startswith(s3_bucket) for u in uris) and len(uris) == 3
    s3_batch = next(loaders.eval_batches(uris, batch_size=64, kind="images"))
    local_uris = loaders.shard_uris(local_run[0], "images", "train")
    local_batch = next(loaders.eval_batches(local_uris, batch_size=64, kind="images"))
    assert s3_batch["key"] == local_batch["key"]
    assert np.array_equal(s3_batch["x"].numpy(), local_batch["x"].numpy())
