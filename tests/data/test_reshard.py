"""Incremental resharding: after raw files are added, changed or removed only the shards holding them change;
every other shard stays byte-identical and is not rewritten (same inode and mtime locally, one object version on
S3), and the summary, the manifest and the shard listing agree."""

from __future__ import annotations

import os
import tarfile

import pytest

from shard_fixtures import _jpeg, _photo, image_cfg, upload_tree
from ulcore import layout, storage
from ulcore.data import loaders
from ulcore.data.sharding import assign, run_shard

A, B = "train/n00000001", "train/n00000002"


def test_assign_cuts_fresh_keeps_old_groups_and_fills_gaps_then_the_last_then_new():
    keys = [f"k{i}" for i in range(7)]
    fresh = assign(keys, 3, {})
    assert fresh == {0: ["k0", "k1", "k2"], 1: ["k3", "k4", "k5"], 2: ["k6"]}
    assert assign(keys, 3, {1: fresh[1]}) == fresh  # resumed after an interruption: the same cut
    assert assign(keys, 3, {0: fresh[0], 2: fresh[2]}) == fresh
    grown = assign(["a", *keys, "k45"], 3, fresh)  # new keys top up the last shard, then open new ones
    assert grown == {**fresh, 2: ["k6", "a", "k45"]}
    shrunk = assign(["k1", "k2", "k6", "x", "y", "z", "w"], 3, fresh)  # shard 1 lost every input
    assert shrunk == {0: ["k1", "k2"], 1: ["x", "y", "z"], 2: ["k6", "w"]}


def _tree(raw) -> None:
    (raw / A).mkdir(parents=True)
    (raw / B).mkdir(parents=True)
    (raw / "LOC_synset_mapping.txt").write_text("n00000001 first\nn00000002 second\n")
    for i in range(3):
        (raw / A / f"a{i}.JPEG").write_bytes(_jpeg(_photo(20, 16, i)))
        (raw / B / f"b{i}.JPEG").write_bytes(_jpeg(_photo(16, 20, 10 + i)))
    (raw / "val").mkdir()
    (raw / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(_jpeg(_photo(16, 16, 30)))
    (raw / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n00000001 1 2 3 4\n")


def _keys(tar: str) -> list[str]:
    with tarfile.open(fileobj=storage.open_read(tar), mode="r|") as tf:
        return [m.name.split(".")[0] for m in tf if m.name.endswith(".cls")]


def _consistent(cfg, summary) -> dict[str, list[str]]:
    """Summary index == finished shards == what readers get; the full manifest is the summary's.
    Returns shard -> keys."""
    root = cfg.storage.root
    uris = loaders.shard_uris(cfg, "images", "train")
    index = summary["splits"]["train"]["index"]
    assert [os.path.basename(u) for u in uris] == [e["shard"] for e in index]
    assert storage.read_json(layout.shards_summary(root))["splits"] == summary["splits"]
    full = storage.read_json(layout.shards_raw_manifest(root))
    assert full["digest"] == summary["raw_manifest"]["digest"] and len(full["entries"]) == full["files"]
    held = {os.path.basename(u): _keys(u) for u in uris}
    assert sum(map(len, held.values())) == summary["splits"]["train"]["samples"]
    return held


def _state(folder) -> dict[str, tuple]:
    """Per shard file: bytes, mtime and inode (an atomic rewrite gets a new inode even with the same bytes)."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(folder.iterdir())}


def test_local_reshard_rewrites_only_the_shards_whose_inputs_changed(ray_session, tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    _tree(raw)
    cfg = image_cfg(str(raw), str(out), "shard.samples_per_shard=2")
    first = run_shard(cfg)
    assert _consistent(cfg, first) == {"train-000000.tar": ["a0", "a1"], "train-000001.tar": ["a2", "b0"],
                                       "train-000002.tar": ["b1", "b2"]}
    folder = out / "data/shards/train"
    before = _state(folder)
    same = run_shard(cfg)
    assert same["run"]["shards_built"] == same["run"]["shards_removed"] == 0 and _state(folder) == before

    (raw / A / "a3.JPEG").write_bytes(_jpeg(_photo(18, 18, 3)))  # sorts between a2 and b0: moves nothing
    grown = run_shard(cfg)
    assert grown["run"] == {**grown["run"], "shards_built": 1, "shards_skipped": 4, "shards_removed": 0}
    held = _consistent(cfg, grown)
    assert held["train-000003.tar"] == ["a3"]
    after = _state(folder)
    assert {k: v for k, v in after.items() if not k.startswith("train-000003")} == before

    (raw / B / "b2.JPEG").write_bytes(_jpeg(_photo(16, 20, 99)))  # changed content
    for name in ("a0.JPEG", "a1.JPEG"):  # every input of shard 0 gone
        (raw / A / name).unlink()
    changed = run_shard(cfg)
    assert changed["run"]["shards_built"] == 1 and changed["run"]["shards_removed"] == 1
    held = _consistent(cfg, changed)
    assert held == {"train-000001.tar": ["a2", "b0"], "train-000002.tar": ["b1", "b2"], "train-000003.tar": ["a3"]}
    final = _state(folder)
    assert "train-000000.tar" not in final and "train-000000.stats.json" not in final
    assert final["train-000002.tar"][0] != after["train-000002.tar"][0]
    for name in ("train-000001.tar", "train-000003.tar", "train-000001.stats.json", "train-000003.stats.json"):
        assert final[name] == after[name], name
    assert changed["raw_manifest"]["digest"] != grown["raw_manifest"]["digest"] != first["raw_manifest"]["digest"]


def test_changed_bytes_of_a_file_name_the_rewritten_shard(ray_session, tmp_path):
    """An input rewritten with other content (same name) changes its shard's digest and, through the summary's
    index, what stage 1 and the FID reference see."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    _tree(raw)
    cfg = image_cfg(str(raw), str(out), "shard.samples_per_shard=2")
    first = run_shard(cfg)
    (raw / A / "a0.JPEG").write_bytes(_jpeg(_photo(20, 16, 77)))
    second = run_shard(cfg)
    digests = [[e["inputs_digest"] for e in s["splits"]["train"]["index"]] for s in (first, second)]
    assert digests[0][0] != digests[1][0] and digests[0][1:] == digests[1][1:]
    assert second["splits"]["train"]["per_class"] == first["splits"]["train"]["per_class"]


@pytest.fixture()
def versioned_bucket(s3_bucket):
    storage.client().put_bucket_versioning(Bucket=s3_bucket[len("s3://"):],
                                           VersioningConfiguration={"Status": "Enabled"})
    return s3_bucket


def _versions(bucket: str, prefix: str) -> dict[str, int]:
    """Object key -> how many versions were ever written (delete markers not counted)."""
    name = bucket[len("s3://"):]
    counts: dict[str, int] = {}
    for page in storage.client().get_paginator("list_object_versions").paginate(Bucket=name, Prefix=prefix):
        for v in page.get("Versions", []):
            counts[v["Key"]] = counts.get(v["Key"], 0) + 1
    return counts


def test_s3_reshard_writes_only_new_and_changed_shards(ray_session, tmp_path, versioned_bucket):
    raw = tmp_path / "raw"
    _tree(raw)
    root = versioned_bucket + "/raw/imagenet"
    upload_tree(raw, root)
    cfg = image_cfg(root, versioned_bucket + "/run", "shard.samples_per_shard=2")
    run_shard(cfg)
    prefix = "run/data/shards/train/"
    first = _versions(versioned_bucket, prefix)
    assert set(first.values()) == {1} and len(first) == 6

    storage.write_bytes(root + f"/{A}/a3.JPEG", _jpeg(_photo(18, 18, 3)))
    storage.remove(root + f"/{B}/b1.JPEG")
    summary = run_shard(cfg)
    assert summary["run"]["shards_built"] == 1 and summary["run"]["shards_removed"] == 0
    held = _consistent(cfg, summary)
    assert held == {"train-000000.tar": ["a0", "a1"], "train-000001.tar": ["a2", "b0"],
                    "train-000002.tar": ["b2", "a3"]}  # b1 went, a3 tops the last shard up
    versions = _versions(versioned_bucket, prefix)
    assert versions == {**first, prefix + "train-000002.tar": 2, prefix + "train-000002.stats.json": 2}
    again = run_shard(cfg)
    assert again["run"]["shards_built"] == 0 and _versions(versioned_bucket, prefix) == versions
