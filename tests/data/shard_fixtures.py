"""Raw-source builders for the data tests: ImageNet / Kinetics trees with the defects real downloads have."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ulcore.config import load_config
from ulcore.data.video import write_video

IMAGE_RES = 16
CLIP_RES = 16
CLIP_FRAMES = 4
CLIP_FPS = 8.0
LABELS = ('dancing (ballet)', 'playing "guitar"', "riding, bike")


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3)
    arr = (base + 100 * np.sin(xx[..., None] / 7 + yy[..., None] / 11 + np.arange(3))) % 256
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def make_imagenet_tree(root: Path) -> dict:
    """ILSVRC2012 layout with the defects real ImageNet has; returns the expected counts."""
    a, b = root / "train" / "n00000001", root / "train" / "n00000002"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    (root / "LOC_synset_mapping.txt").write_text("n00000001 first class\nn00000002 second, with comma\n")
    for i, (w, h) in enumerate([(50, 37), (64, 64), (20, 90)]):
        (a / f"n00000001_{i}.JPEG").write_bytes(_jpeg(_photo(w, h, i)))
        (b / f"n00000002_{i}.JPEG").write_bytes(_jpeg(_photo(h, w, 10 + i)))
    (a / "n00000001_cmyk.JPEG").write_bytes(_jpeg(Image.new("RGB", (40, 30), (255, 0, 0)).convert("CMYK")))
    (a / "n00000001_grey.JPEG").write_bytes(_jpeg(_photo(33, 47, 5).convert("L")))
    png = io.BytesIO()
    Image.new("RGBA", (24, 24), (0, 0, 255, 255)).save(png, format="PNG")
    (a / "n00000001_png.JPEG").write_bytes(png.getvalue())  # a PNG named .JPEG, as in real ImageNet
    full = _jpeg(_photo(64, 48, 7))
    (a / "n00000001_trunc.JPEG").write_bytes(full[: len(full) // 2])
    (a / "n00000001_empty.JPEG").write_bytes(b"")
    (b / "n00000002_notes.txt").write_text("not an image")
    _mac_and_windows_debris(root / "train", a.name, "n00000001_0.JPEG")
    val = root / "val"
    val.mkdir()
    rows = ["ImageId,PredictionString"]
    for i, wnid in enumerate(["n00000001", "n00000002", "n00000002"]):
        (val / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(_jpeg(_photo(30 + i, 40, 20 + i)))
        rows.append(f"ILSVRC2012_val_{i:08d},{wnid} 1 2 3 4 {wnid} 5 6 7 8")
    rows.append("ILSVRC2012_val_00000099,n00000001 1 2 3 4")  # listed, file absent
    (val / "ILSVRC2012_val_00000050.JPEG").write_bytes(_jpeg(_photo(30, 30, 50)))  # file with no label
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    (val / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return {"train": {"samples": 9, "reasons": {"empty": 1, "truncated": 1, "unknown_extension": 1}, "ignored": 5},
            "val": {"samples": 3, "reasons": {"missing": 1, "unlabelled": 1}, "ignored": 1}}


def _mac_and_windows_debris(split_dir: Path, folder: str, name: str) -> None:
    """What a copy through Finder / Explorer leaves in a split folder (`folder` below it): 5 files, no sample."""
    (split_dir / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (split_dir / folder / f"._{name}").write_bytes(b"\0\5\26\7AppleDouble")  # stem '' : the reported crash
    (split_dir / "__MACOSX" / folder).mkdir(parents=True)
    (split_dir / "__MACOSX" / folder / f"._{name}").write_bytes(b"\0\5\26\7")
    (split_dir / folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (split_dir / folder / "desktop.ini").write_text("[.ShellClassInfo]\n")


def _clip(frames: int, w: int, h: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((frames, h, w, 3), np.uint8)
    colour = rng.integers(40, 255, 3)
    for t in range(frames):
        out[t] = (np.arange(3) * 40 + t * 3) % 255
        y, x = (t * 2) % (h - 6), (t * 3) % (w - 6)
        out[t, y:y + 6, x:x + 6] = colour
    return out


def make_kinetics_tree(root: Path, good: int = 4) -> dict:
    """Kinetics-600 layout: good mp4 clips at mixed fps/aspect, a webm, and missing/short/broken/empty clips."""
    train, val = root / "videos" / "train", root / "videos" / "validate"
    train.mkdir(parents=True)
    val.mkdir(parents=True)
    (root / "annotations").mkdir()
    rows: dict[str, list[dict]] = {"train": [], "validate": []}

    def add(split: str, folder: Path, yid: str, label: str, clip: np.ndarray | None, fps: float = 25.0,
            ext: str = ".mp4", raw: bytes | None = None) -> None:
        rows[split].append({"label": label, "youtube_id": yid, "time_start": 10, "time_end": 20, "split": split})
        path = folder / f"{yid}_000010_000020{ext}"
        if raw is not None:
            path.write_bytes(raw)
        elif clip is not None:
            write_video(clip, str(path), fps=fps, codec="libvpx" if ext == ".webm" else "libx264")

    sizes = [(40, 30), (30, 44), (64, 36)]
    for i in range(good):
        w, h = sizes[i % len(sizes)]
        add("train", train, f"good{i:07d}", LABELS[i % 3], _clip(24, w, h, i), fps=(25.0, 30.0)[i % 2])
    add("train", train, "webmclip000", LABELS[1], _clip(24, 48, 32, 99), ext=".webm")
    add("train", train, "missing0000", LABELS[0], None)
    add("train", train, "tooshort000", LABELS[0], _clip(5, 40, 30, 7), fps=25.0)  # 0.2 s -> 2 frames at 8 fps
    broken = train / "broken00000_000010_000020.mp4"
    write_video(_clip(24, 40, 30, 8), str(broken), fps=25.0)
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 3])
    rows["train"].append({"label": LABELS[2], "youtube_id": "broken00000", "time_start": 10, "time_end": 20,
                          "split": "train"})
    add("train", train, "emptyclip00", LABELS[2], None, raw=b"")
    _mac_and_windows_debris(train, "", "good0000000_000010_000020.mp4")
    add("validate", val, "valclip0000", LABELS[2], _clip(24, 40, 30, 11))
    add("validate", val, "valclip0001", LABELS[0], _clip(24, 30, 40, 12))
    for split, file in (("train", "train.csv"), ("validate", "validate.csv")):
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["label", "youtube_id", "time_start", "time_end", "split"])
        writer.writeheader()
        writer.writerows(rows[split])
        (root / "annotations" / file).write_text(buf.getvalue())
    return {"train": {"samples": good + 1, "reasons": {"empty": 1, "missing": 1, "too_short": 1, "undecodable": 1},
                      "ignored": 5},
            "val": {"samples": 2, "reasons": {}, "ignored": 0}}


def image_cfg(raw: str, out: str, *extra: str):
    return load_config(None, ["data.source=imagenet", f"data.root={raw}", f"storage.root={out}",
                              f"data.resolution={IMAGE_RES}", "shard.samples_per_shard=4", *extra])


def video_cfg(raw: str, out: str, *extra: str):
    return load_config(None, ["data.source=kinetics", f"data.root={raw}", f"storage.root={out}",
                              f"data.resolution={CLIP_RES}", f"video.frames={CLIP_FRAMES}", f"video.fps={CLIP_FPS}",
                              f"model.frames={CLIP_FRAMES}", "data.random_flip=false", "shard.samples_per_shard=2",
                              *extra])


def upload_tree(local: Path, uri: str) -> None:
    from ulcore import storage

    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.upload_file(str(path), storage.join(uri, os.path.relpath(path, local)))

