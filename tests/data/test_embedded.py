"""The embedded Fashion-MNIST sources: layouts the real sharders accept, determinism, rebuild on param change."""

from __future__ import annotations

import csv
import hashlib

import numpy as np
from PIL import Image

from ulcore.config import load_config
from ulcore.data import embedded
from ulcore.data.kinetics import list_split, read_classes
from ulcore.data.video import decode_clip


def _digest(folder) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def test_asset_is_a_real_balanced_subset():
    subset = embedded.load_subset()
    assert subset["train_images"].shape == (5000, 28, 28) and subset["val_images"].shape == (1000, 28, 28)
    assert np.bincount(subset["train_labels"]).tolist() == [500] * 10
    assert list(subset["class_names"])[0] == "T-shirt/top" and embedded.ASSET.stat().st_size < 4 * 2**20


def test_image_layout_deterministic_and_idempotent(tmp_path):
    cfg = load_config(None, ["data.embedded_train_per_class=3", "data.embedded_val_per_class=2"])
    a, b = tmp_path / "a", tmp_path / "b"
    embedded.write_images(str(a), cfg)
    embedded.write_images(str(b), cfg)
    assert _digest(a) == _digest(b)
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*.JPEG"))
    assert len(files) == 10 * 5 and files[0] == "train/n00000000/n00000000_train_00000.JPEG"
    assert (a / "LOC_synset_mapping.txt").read_text().splitlines()[9] == "n00000009 Ankle boot"
    img = Image.open(a / "val/n00000003/n00000003_val_00001.JPEG")
    assert img.size == (32, 32) and img.mode == "RGB"
    stamp = (a / "embedded.json").stat().st_mtime_ns
    embedded.write_images(str(a), cfg)  # identical params: nothing rewritten
    assert (a / "embedded.json").stat().st_mtime_ns == stamp
    bigger = load_config(None, ["data.embedded_train_per_class=3", "data.embedded_val_per_class=2",
                                "data.resolution=64", "model.patch_size=2"])
    embedded.write_images(str(a), bigger)
    assert Image.open(a / "val/n00000003/n00000003_val_00001.JPEG").size == (64, 64)
    assert len(list(a.rglob("*.JPEG"))) == 50


def test_video_layout_is_kinetics(tmp_path):
    cfg = load_config(None, ["data.source=embedded-video", "model.frames=8", "video.frames=8",
                             "data.embedded_train_per_class=1", "data.embedded_val_per_class=1"])
    root = tmp_path / "v"
    embedded.write_video_set(str(root), cfg)
    with open(root / "annotations/train.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and set(rows[0]) == {"label", "youtube_id", "time_start", "time_end", "split"}
    assert {r["label"] for r in rows} >= {"T-shirt/top", "Ankle boot"}
    labels = read_classes(str(root), cfg)
    listed = list_split(str(root), cfg, "val", labels)
    assert len(listed.items) == 10 and listed.rejects == [] and listed.ignored == 0
    clip = decode_clip(listed.items[0].uri, fps=8.0, resolution=32, frames=8, timeout_s=30)
    assert clip.shape == (8, 32, 32, 3)
    assert np.abs(clip[-1].astype(int) - clip[0].astype(int)).mean() > 1  # the object moves
