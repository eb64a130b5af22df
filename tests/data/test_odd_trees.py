"""Property: whatever odd files a raw tree holds, the shard stage finishes and accounts for every file once.

Random trees of both layouts (names with spaces, dots, commas, non-ASCII and combining characters, mixed-case and
unknown extensions, hidden and file-manager files, nested folders, broken symlinks, empty and undecodable files)
are sharded for real; then accepted + rejected + ignored = the files on disk, and sample keys are unique.
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shard_fixtures import _clip, _jpeg, _photo, image_cfg, video_cfg
from ulcore.data.kinetics import clip_stem
from ulcore.data.sharding import run_shard
from ulcore.data.video import write_video

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
# a small alphabet, so that names often collide after sanitising (`a b`/`a_b`/`a.b`, `é` composed or not)
STEM = st.text(alphabet="aZ0 _-.,'é猫\u0301", min_size=1, max_size=4)
SPECIAL = st.sampled_from([".DS_Store", "Thumbs.db", "desktop.ini", "DESKTOP.INI"])
KIND = st.sampled_from(["good", "junk", "empty", "dangling"])


def _hidden(rel: str) -> bool:
    """The rule the listing promises: a dot-named part, or a file-manager folder / file (any case)."""
    return any(p.startswith(".") or p.lower() in ("__macosx", "thumbs.db", "desktop.ini") for p in rel.split("/"))


def _write(path: Path, kind: str, good: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(path):
        path.unlink()
    if kind == "dangling":
        os.symlink(path.parent / "no-such-target", path)
    else:
        path.write_bytes({"good": good, "junk": b"\x00junk\xff" * 3, "empty": b""}[kind])


def _check_accounting(raw: Path, split_dir: Path, out: Path, summary: dict) -> None:
    on_disk = sorted(str(Path(d) / f) for d, _, files in os.walk(split_dir) for f in files)
    hidden = [p for p in on_disk if _hidden(os.path.relpath(p, split_dir))]
    keys, accepted = [], []
    for tar in sorted((out / "data" / "shards" / "train").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for member in tf.getmembers():
                key, ext = member.name.split(".", 1)
                if ext == "json":
                    keys.append(key)
                    accepted.append(str(raw / json.loads(tf.extractfile(member).read())["source"]))
    rejected = [r["path"] for r in summary["rejected"]
                if r["split"] == "train" and r["reason"] != "missing" and os.path.lexists(r["path"])]
    split = summary["splits"]["train"]
    assert split["ignored"] == len(hidden) and split["capped"] == 0 and split["samples"] == len(accepted)
    assert sorted(accepted + rejected + hidden) == on_disk  # each file exactly once
    assert len(set(keys)) == len(keys)
    assert all(r["reason"] and r["detail"] for r in summary["rejected"])


IMAGE_ENTRY = st.tuples(
    st.sampled_from(["n00000001", "n00000002", "n00000001/sub", "__MACOSX/n00000001", ".cache", ""]),
    st.one_of(st.builds(str.__add__, STEM, st.sampled_from([".JPEG", ".jpeg", ".JPG", ".jpg", ".png", ".txt", ""])),
              SPECIAL),
    KIND)


@SETTINGS
@given(st.lists(IMAGE_ENTRY, max_size=8))
def test_imagenet_tree_of_odd_names(ray_session, entries):
    good = _jpeg(_photo(12, 10, 1))
    with tempfile.TemporaryDirectory() as tmp:
        raw, out = Path(tmp) / "raw", Path(tmp) / "out"
        (raw / "train" / "n00000001").mkdir(parents=True)
        (raw / "LOC_synset_mapping.txt").write_text("n00000001 one\nn00000002 two\n")
        _write(raw / "train" / "n00000001" / "anchor.JPEG", "good", good)
        for folder, name, kind in entries:
            if name not in (".", ".."):
                _write(raw / "train" / folder / name, kind, good)
        summary = run_shard(image_cfg(str(raw), str(out), "data.splits=[train]"))
        _check_accounting(raw, raw / "train", out, summary)


@pytest.fixture(scope="module")
def clip_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("clip") / "c.mp4"
    write_video(_clip(12, 24, 20, 3), str(path), fps=12.0)
    return path.read_bytes()


VIDEO_ENTRY = st.tuples(
    st.sampled_from(["", "dancing", "__MACOSX", ".cache"]),
    STEM,  # youtube id
    st.sampled_from([".mp4", ".MP4", ".webm", ".mp4.part", ".txt"]),
    KIND,
    st.sampled_from(["cat", "dog", "", None]),  # annotation label; None = no row names the file
)


@SETTINGS
@given(st.lists(VIDEO_ENTRY, max_size=6), st.lists(st.tuples(STEM, st.sampled_from(["cat", "dog"])), max_size=2))
def test_kinetics_tree_of_odd_names(ray_session, clip_bytes, entries, rows_without_files):
    with tempfile.TemporaryDirectory() as tmp:
        raw, out = Path(tmp) / "raw", Path(tmp) / "out"
        videos = raw / "videos" / "train"
        rows = [("cat", "anchor", 0)]
        _write(videos / f"{clip_stem('anchor', '0', '1')}.mp4", "good", clip_bytes)
        for n, (folder, yid, ext, kind, label) in enumerate(entries):
            _write(videos / folder / f"{clip_stem(yid, str(n), str(n + 1))}{ext}", kind, clip_bytes)
            if label is not None:
                rows.append((label, yid, n))
        rows += [(label, yid, 100 + n) for n, (yid, label) in enumerate(rows_without_files)]
        (raw / "annotations").mkdir()
        lines = [f'{label},"{yid}",{start},{start + 1},train\n' for label, yid, start in rows]
        (raw / "annotations" / "train.csv").write_text("label,youtube_id,time_start,time_end,split\n" + "".join(lines))
        cfg = video_cfg(str(raw), str(out), "data.splits=[train]", "video.annotations={train: train.csv}",
                        "video.video_dirs={train: train}")
        summary = run_shard(cfg)
        _check_accounting(raw, videos, out, summary)
