"""The embedded default datasets: the Fashion-MNIST subset shipped in the package, laid out as raw sources.

`embedded` writes it in the ILSVRC2012 layout (JPEGs in pseudo-wnid class folders n00000000..n00000009 plus
LOC_synset_mapping.txt with the real class names) so the real ImageNet sharder runs on it; `embedded-video`
writes a Kinetics-layout set (moving, tinted Fashion-MNIST objects over a colour gradient, libx264 mp4 files at a
non-square size and 24 fps, annotation CSVs) so the real Kinetics sharder - fps resampling, short-side resize,
centre crop - runs too. No network; the output is a pure function of the asset and the params.

A folder is complete when its `embedded.json` manifest (written last) matches the params; otherwise it is
rebuilt from scratch, so changing `data.resolution` never mixes old and new files.
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ulcore import storage
from ulcore.config import Config
from ulcore.data.video import write_video

ASSET = Path(__file__).with_name("assets") / "fashion_mnist_subset.npz"
MANIFEST = "embedded.json"
LAYOUT_VERSION = 1  # bump when the generated files change for the same params
SOURCE_FPS = 24.0  # film rate, so the sharder's resampling to video.fps is exercised


def load_subset() -> dict[str, np.ndarray]:
    with np.load(ASSET, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def wnid(cls: int) -> str:
    return f"n{cls:08d}"


def _per_class(images: np.ndarray, labels: np.ndarray, count: int, key: str) -> list[list[np.ndarray]]:
    """The first `count` images of each class, in asset order; too few in the asset is a params error."""
    groups = []
    for cls in range(int(labels.max()) + 1):
        chosen = images[labels == cls][:count]
        if len(chosen) < count:
            raise ValueError(f"{key} = {count}: the embedded asset holds only {len(chosen)} images of class {cls}")
        groups.append(list(chosen))
    return groups


def _already_built(root: str, manifest: dict) -> bool:
    uri = storage.join(root, MANIFEST)
    try:
        return storage.read_json(uri) == manifest
    except (FileNotFoundError, ValueError):
        return False


def _publish(staging: str, root: str, manifest: dict) -> None:
    """Move a finished local staging folder to `root` (replacing any stale build); the manifest goes last."""
    storage.write_json(os.path.join(staging, MANIFEST), manifest)
    if storage.is_s3(root):
        storage.remove(root)
        files = sorted(storage.list_uris(staging), key=lambda p: os.path.basename(p) == MANIFEST)
        for path in files:
            storage.upload_file(path, storage.join(root, os.path.relpath(path, staging).replace(os.sep, "/")))
        return
    if os.path.exists(root):
        shutil.rmtree(root)
    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    storage.publish_local(staging, root)


def _staging_dir(root: str) -> str:
    """Beside the target for local roots (same filesystem: the final rename is atomic), else a temp folder."""
    if storage.is_s3(root):
        return tempfile.mkdtemp(prefix="ul-embedded-")
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.", dir=parent)


def _video_geometry(cfg: Config) -> tuple[int, int, int]:
    """(seconds, height, width) of the embedded-video clips."""
    seconds = math.ceil(cfg.video.frames / cfg.video.fps) + 1  # one spare second so fps rounding never cuts short
    height = 2 * round(cfg.data.resolution * 5 / 8)  # landscape and larger than the target: resize + crop do work
    return seconds, height, 2 * round(height * 3 / 4)


def build_spec(cfg: Config) -> dict:
    """What a build of the embedded source `data.source` is a function of, besides the asset: its embedded.json."""
    d, v = cfg.data, cfg.video
    spec = {"version": LAYOUT_VERSION, "resolution": d.resolution, "train_per_class": d.embedded_train_per_class,
            "val_per_class": d.embedded_val_per_class}
    if d.source == "embedded":
        return {"layout": "imagenet", **spec}
    if d.source == "embedded-video":
        return {"layout": "kinetics", **spec, "seconds": _video_geometry(cfg)[0], "annotations": dict(v.annotations),
                "video_dirs": dict(v.video_dirs)}
    raise ValueError(f"data.source = {d.source!r} is not an embedded source")


def write_images(root: str, cfg: Config) -> str:
    """ILSVRC2012 layout of the subset at data.resolution RGB; skipped when an identical build is present."""
    d = cfg.data
    manifest = build_spec(cfg)
    if _already_built(root, manifest):
        return root
    subset = load_subset()
    names = [str(n) for n in subset["class_names"]]
    staging = _staging_dir(root)
    try:
        for split, count, key in (("train", d.embedded_train_per_class, "data.embedded_train_per_class"),
                                  ("val", d.embedded_val_per_class, "data.embedded_val_per_class")):
            for cls, images in enumerate(_per_class(subset[f"{split}_images"], subset[f"{split}_labels"], count, key)):
                folder = os.path.join(staging, split, wnid(cls))
                os.makedirs(folder, exist_ok=True)
                for n, img in enumerate(images):
                    rgb = Image.fromarray(img, "L").resize((d.resolution,) * 2, Image.Resampling.BICUBIC).convert("RGB")
                    rgb.save(os.path.join(folder, f"{wnid(cls)}_{split}_{n:05d}.JPEG"), quality=95)
        with open(os.path.join(staging, "LOC_synset_mapping.txt"), "w") as f:
            f.writelines(f"{wnid(c)} {name}\n" for c, name in enumerate(names))
        _publish(staging, root, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def moving_object_clip(obj: np.ndarray, *, frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """(frames, H, W, 3) uint8: a tinted object sliding and bouncing over a two-colour gradient.

    The object's brightness is its alpha, so the garment silhouette (the class evidence) stays visible on any
    background; speed is 0.5-1.5 object sizes per second at SOURCE_FPS so consecutive 8 fps frames differ.
    """
    rng = np.random.default_rng(seed)
    size = max(8, int(round(0.6 * height)))
    sprite = np.asarray(Image.fromarray(obj, "L").resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255
    tint = rng.uniform(0.5, 1.0, 3).astype(np.float32)
    ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    tilt = np.linspace(0.0, 0.3, height, dtype=np.float32)[:, None, None]
    c0, c1 = rng.uniform(0.0, 0.45, 3).astype(np.float32), rng.uniform(0.0, 0.45, 3).astype(np.float32)
    background = np.clip(c0 + (c1 - c0) * ramp + tilt * (c1 - c0), 0, 1)
    span = np.array([height - size, width - size], np.float32)
    pos = rng.uniform(0, 1, 2).astype(np.float32) * span
    speed = rng.uniform(0.5, 1.5) * size / SOURCE_FPS
    angle = rng.uniform(0, 2 * math.pi)
    vel = np.array([math.sin(angle), math.cos(angle)], np.float32) * speed
    out = np.empty((frames, height, width, 3), np.uint8)
    alpha = sprite[..., None]
    for t in range(frames):
        frame = background.copy()
        y, x = (int(round(p)) for p in pos)
        window = frame[y:y + size, x:x + size]
        window[:] = window * (1 - alpha) + alpha * tint
        out[t] = np.round(frame * 255).astype(np.uint8)
        pos = pos + vel
        for axis in range(2):  # reflect off the borders
            if pos[axis] < 0 or pos[axis] > span[axis]:
                vel[axis] = -vel[axis]
                pos[axis] = np.clip(pos[axis], 0, span[axis])
    return out


def write_video_set(root: str, cfg: Config) -> str:
    """Kinetics layout of moving-object clips, one class per Fashion-MNIST class; skipped when already built."""
    d, v = cfg.data, cfg.video
    seconds, height, width = _video_geometry(cfg)
    manifest = build_spec(cfg)
    if _already_built(root, manifest):
        return root
    missing = [s for s in ("train", "val") if s not in v.annotations or s not in v.video_dirs]
    if missing:
        raise ValueError(f"video.annotations / video.video_dirs need entries for {missing} to build embedded-video")
    subset = load_subset()
    names = [str(n) for n in subset["class_names"]]
    staging = _staging_dir(root)
    jobs = []
    try:
        for split, count, key in (("train", d.embedded_train_per_class, "data.embedded_train_per_class"),
                                  ("val", d.embedded_val_per_class, "data.embedded_val_per_class")):
            folder = os.path.join(staging, "videos", v.video_dirs[split])
            os.makedirs(folder, exist_ok=True)
            rows = []
            for cls, images in enumerate(_per_class(subset[f"{split}_images"], subset[f"{split}_labels"], count, key)):
                for n, img in enumerate(images):
                    youtube_id = f"fm{split[0]}{cls}{n:07d}"  # 11 characters, like a YouTube id
                    rows.append({"label": names[cls], "youtube_id": youtube_id, "time_start": 0,
                                 "time_end": seconds, "split": split})
                    seed = (1 if split == "train" else 2) * 1_000_003 + cls * 10_007 + n
                    jobs.append((img, os.path.join(folder, f"{youtube_id}_{0:06d}_{seconds:06d}.mp4"), seed))
            ann = os.path.join(staging, "annotations", v.annotations[split])
            os.makedirs(os.path.dirname(ann), exist_ok=True)
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=["label", "youtube_id", "time_start", "time_end", "split"])
            writer.writeheader()
            writer.writerows(rows)
            Path(ann).write_text(buf.getvalue())

        def encode(job: tuple[np.ndarray, str, int]) -> None:
            img, path, seed = job
            clip = moving_object_clip(img, frames=int(seconds * SOURCE_FPS), height=height, width=width, seed=seed)
            write_video(clip, path, fps=SOURCE_FPS, timeout_s=v.ffmpeg_timeout_s)

        # ffmpeg runs in its own process, so threads give real parallelism here
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(encode, jobs))
        _publish(staging, root, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def ensure_source(cfg: Config, root: str) -> str:
    """Build the embedded source `cfg.data.source` under `root` unless an identical build is there."""
    if cfg.data.source == "embedded":
        return write_images(root, cfg)
    if cfg.data.source == "embedded-video":
        return write_video_set(root, cfg)
    raise ValueError(f"data.source = {cfg.data.source!r} is not an embedded source")


__all__ = ["ASSET", "load_subset", "wnid", "build_spec", "write_images", "moving_object_clip", "write_video_set",
           "ensure_source"]
