"""The reference stage: FID statistics of the real images, computed once per key and reused (real FID network,
real image shards at smoke scale)."""

from __future__ import annotations

import numpy as np
import pytest

from ulcore.config import load_config
from ulcore.eval.fid import feature_statistics, load_reference_stats, reference_key
from ulcore.eval.inception import FidWeightsNotFound

from .conftest import write_image_shards


def _cfg(root, *overrides):
    return load_config(None, [f"storage.root={root}", "eval.num_samples=4", "eval.batch_size=3",
                              "eval.reference_samples=0", *overrides])


def test_computes_both_references_once_and_they_are_the_images_statistics(tmp_path, gray_images, extractor):
    from ulcore.data.loaders import eval_batches, shard_uris
    from ulcore.eval.reference import run_reference

    cfg = _cfg(tmp_path)
    write_image_shards(cfg, gray_images)
    first = run_reference(cfg)
    assert first["computed"] == ["gfid_reference", "rfid_reference"]
    assert (first["gfid_reference"]["n"], first["rfid_reference"]["n"]) == (8, 4)  # the whole split; num_samples
    assert (first["gfid_reference"]["split"], first["rfid_reference"]["split"]) == ("train", "val")
    assert "| gfid_reference | train | 8 |" in first["markdown"] and "computed |" in first["markdown"]

    for role, split, n in (("gfid_reference", "train", 0), ("rfid_reference", "val", 4)):
        uris = shard_uris(cfg, "images", split)
        images = np.concatenate([b["x"].numpy() for b in eval_batches(uris, batch_size=8, kind="images")])
        want = feature_statistics(extractor(images[:n or None]))
        key_hash, key = _key(cfg, split, n, extractor, uris)
        assert key_hash == first[role]["key_hash"]
        stats, info = load_reference_stats(str(tmp_path), key_hash, key)
        assert info["file_sha256"] == first[role]["file_sha256"] and stats.n == want.n
        np.testing.assert_allclose(stats.mu, want.mu, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(stats.sigma, want.sigma, rtol=1e-5, atol=1e-8)

    again = run_reference(cfg)  # nothing to do: same keys, same files
    assert again["computed"] == [] and "cached |" in again["markdown"]
    assert again["gfid_reference"]["file_sha256"] == first["gfid_reference"]["file_sha256"]

    more = run_reference(_cfg(tmp_path, "eval.num_samples=6"))  # another N held out: only that key is new
    assert more["computed"] == ["rfid_reference"] and more["rfid_reference"]["n"] == 6


def test_a_split_smaller_than_n_is_read_once_and_cached_with_what_it_holds(tmp_path, gray_images):
    """eval.reference_samples = 200 on an 8-image split: the statistics of all 8, cached under the key of 200, so
    the evaluations after the reference stage do not read the split again."""
    from ulcore.eval.reference import run_reference

    cfg = _cfg(tmp_path, "eval.reference_samples=200")
    write_image_shards(cfg, gray_images)
    first = run_reference(cfg)
    assert "gfid_reference" in first["computed"] and first["gfid_reference"]["n"] == 8
    again = run_reference(cfg)
    assert again["computed"] == [] and again["gfid_reference"]["file_sha256"] == first["gfid_reference"]["file_sha256"]


def _key(cfg, split, n, extractor, uris):
    from ulcore.eval.fid import data_fingerprint

    return reference_key(split=split, resolution=cfg.data.resolution, weights_sha256=extractor.sha256, n=n,
                         data_fingerprint=data_fingerprint(uris), frames=cfg.model.frames)


def test_a_missing_fid_network_fails_before_any_work(tmp_path, gray_images):
    from ulcore.eval.reference import run_reference

    cfg = _cfg(tmp_path, f"eval.fid_weights={tmp_path / 'nope.pt'}")
    write_image_shards(cfg, gray_images)
    with pytest.raises(FidWeightsNotFound, match="eval.fid_weights = .*nope.pt.*no such file"):
        run_reference(cfg)
    assert not (tmp_path / "data" / "fid_refs").exists()


def test_fid_floor_is_zero_for_identical_sets_and_cached_with_the_references(tmp_path, gray_images, extractor):
    from ulcore import storage
    from ulcore.data.loaders import shard_uris
    from ulcore.layout import fid_floor as floor_uri
    from ulcore.eval.reference import Reference, fid_floor, floor_reference

    cfg = _cfg(tmp_path)
    write_image_shards(cfg, gray_images)
    train_uris = shard_uris(cfg, "images", "train")
    train = floor_reference(cfg, train_uris, extractor.sha256)  # the first num_samples = 4 training images
    held_out = Reference(cfg, "val", shard_uris(cfg, "images", "val"), 4, extractor.sha256)
    for ref in (train, held_out):
        ref.fill(extractor, 3)
    assert train.n == 4 and train.split == "train"
    assert fid_floor(train, train)[0] == pytest.approx(0.0, abs=1e-6)  # real vs the same real images
    floor, cached = fid_floor(train, held_out)
    assert floor > 1.0 and not cached  # other images: a positive floor, stored next to the statistics
    uri = floor_uri(str(tmp_path), train.key_hash, held_out.key_hash)
    assert storage.read_json(uri)["fid_floor"] == floor
    again = Reference(cfg, "train", train_uris, 4, extractor.sha256)  # a later run: loaded from the cache
    assert not again.needed and fid_floor(again, held_out) == (floor, True)
    assert floor_reference(cfg, train_uris, extractor.sha256, held_out, again) is again  # same key: reused
    storage.write_json(uri, {**storage.read_json(uri), "train_sha256": "another file"})
    assert fid_floor(again, held_out) == (pytest.approx(floor, rel=1e-6), False)  # not the files it came from


def test_reference_stage_reports_the_fid_floor(tmp_path, gray_images):
    from ulcore.eval.reference import run_reference

    cfg = _cfg(tmp_path)
    write_image_shards(cfg, gray_images)
    first = run_reference(cfg)
    assert first["fid_floor"]["value"] > 0 and not first["fid_floor"]["cached"]
    assert first["fid_floor"]["train_reference"]["n"] == 4 and "FID floor:" in first["markdown"]
    again = run_reference(cfg)
    assert again["fid_floor"]["cached"] and again["fid_floor"]["value"] == first["fid_floor"]["value"]
