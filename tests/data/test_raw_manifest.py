"""The raw-data manifest: its digest changes when a raw file is added, changed or removed, and not otherwise."""

from __future__ import annotations

import os

import pytest

from shard_fixtures import _jpeg, _photo, image_cfg, upload_tree
from ulcore import layout, storage
from ulcore.config import load_config
from ulcore.data.manifest import fingerprints, raw_manifest, run_raw_manifest


def _tree(root) -> None:
    for i, rel in enumerate(("train/n00000001/a.JPEG", "train/n00000002/b.JPEG", "val/n00000001/c.JPEG")):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_jpeg(_photo(8, 8, i)))
    (root / "LOC_synset_mapping.txt").write_text("n00000001 first\nn00000002 second\n")


def test_local_digest_follows_adds_changes_and_removals_only(tmp_path):
    raw = tmp_path / "raw"
    _tree(raw)
    cfg = image_cfg(str(raw), str(tmp_path / "out"))
    first = raw_manifest(cfg)
    b = raw / "train/n00000002/b.JPEG"
    assert [e["key"] for e in first["entries"]] == ["LOC_synset_mapping.txt", "train/n00000001/a.JPEG",
                                                     "train/n00000002/b.JPEG", "val/n00000001/c.JPEG"]
    assert first["entries"][2] == {"key": "train/n00000002/b.JPEG", "size": b.stat().st_size,
                                   "mtime_ns": b.stat().st_mtime_ns}
    assert first["files"] == 4 and first["bytes"] == sum(p.stat().st_size for p in raw.rglob("*") if p.is_file())
    (raw / "train" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # file-manager debris holds no sample
    (raw / "train/n00000001/._a.JPEG").write_bytes(b"\0\5")
    assert raw_manifest(cfg)["digest"] == first["digest"]

    new = raw / "train/n00000002/d.JPEG"
    new.write_bytes(_jpeg(_photo(8, 8, 9)))
    added = raw_manifest(cfg)
    assert added["digest"] != first["digest"] and added["files"] == 5
    new.unlink()
    assert raw_manifest(cfg)["digest"] == first["digest"]  # removal: back to the same files

    os.utime(b, ns=(b.stat().st_atime_ns, b.stat().st_mtime_ns + 10**9))  # rewritten, same size
    changed = raw_manifest(cfg)
    assert changed["digest"] != first["digest"]
    assert fingerprints(changed)["train/n00000002/b.JPEG"] != fingerprints(first)["train/n00000002/b.JPEG"]
    b.unlink()
    assert raw_manifest(cfg)["digest"] not in (first["digest"], changed["digest"])


def test_unreadable_entries_are_kept_with_their_reason_and_a_missing_root_is_named(tmp_path):
    raw = tmp_path / "raw"
    _tree(raw)
    os.symlink(raw / "gone.JPEG", raw / "train/n00000001/link.JPEG")
    cfg = image_cfg(str(raw), str(tmp_path / "out"))
    entries = {e["key"]: e for e in raw_manifest(cfg)["entries"]}
    assert entries["train/n00000001/link.JPEG"] == {"key": "train/n00000001/link.JPEG", "unreadable": "broken_link"}
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"data.root = '{missing}': no such folder"):
        raw_manifest(image_cfg(missing, str(tmp_path / "out")))


def test_s3_digest_uses_etags_and_follows_adds_changes_and_removals(tmp_path, s3_bucket):
    raw = tmp_path / "raw"
    _tree(raw)
    root = s3_bucket + "/raw/imagenet"
    upload_tree(raw, root)
    storage.write_bytes(root + "/train/.DS_Store", b"\0")
    cfg = image_cfg(root, s3_bucket + "/out")
    first = raw_manifest(cfg)
    assert [e["key"] for e in first["entries"]][0] == "LOC_synset_mapping.txt" and first["files"] == 4
    assert all(set(e) == {"key", "size", "etag"} for e in first["entries"])
    assert raw_manifest(cfg)["digest"] == first["digest"]
    storage.write_bytes(root + "/train/n00000001/new.JPEG", _jpeg(_photo(8, 8, 5)))
    added = raw_manifest(cfg)
    assert added["digest"] != first["digest"]
    storage.remove(root + "/train/n00000001/new.JPEG")
    assert raw_manifest(cfg)["digest"] == first["digest"]
    storage.write_bytes(root + "/train/n00000002/b.JPEG", _jpeg(_photo(8, 8, 6)))  # new content, new ETag
    assert raw_manifest(cfg)["digest"] not in (first["digest"], added["digest"])
    with pytest.raises(FileNotFoundError, match=f"data.root = '{s3_bucket}/nothing': no objects"):
        raw_manifest(image_cfg(s3_bucket + "/nothing", s3_bucket + "/out"))


def test_embedded_manifest_is_the_asset_and_build_spec(tmp_path):
    cfg = load_config(None, [f"storage.root={tmp_path}"])
    doc = raw_manifest(cfg)
    assert doc["source"] == "embedded" and doc["entries"] == [] and len(doc["embedded"]["asset_sha256"]) == 64
    assert not (tmp_path / "data").exists()  # nothing generated to list
    other = raw_manifest(load_config(None, [f"storage.root={tmp_path}", "data.resolution=16"]))
    assert other["digest"] != doc["digest"] and raw_manifest(cfg)["digest"] == doc["digest"]


def test_stage_writes_the_record_only_when_it_changed(tmp_path):
    raw = tmp_path / "raw"
    _tree(raw)
    cfg = image_cfg(str(raw), str(tmp_path / "out"))
    result = run_raw_manifest(cfg)
    path = tmp_path / "out" / layout.RAW_MANIFEST
    assert result["changed"] and storage.read_json(str(path)) == {k: v for k, v in result.items() if k != "changed"}
    assert "entries" not in storage.read_json(str(path))
    before = path.stat().st_mtime_ns, path.stat().st_ino
    assert not run_raw_manifest(cfg)["changed"]
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == before
    (raw / "val/n00000001/e.JPEG").write_bytes(_jpeg(_photo(8, 8, 7)))
    assert run_raw_manifest(cfg)["changed"] and storage.read_json(str(path))["files"] == 5
