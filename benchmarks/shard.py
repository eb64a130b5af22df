"""Sharder throughput vs a bare loop on the same files, and the npy vs mp4 clip-storage trade-off.

    .venv/bin/python benchmarks/shard.py [--images 300] [--clips 24] [--image-res 64] [--clip-res 128]

1. images/s of `run_shard` (one Ray task at a time, so it is per core) vs a bare loop that decodes, ADM-crops,
   PNG-encodes and tars the same JPEGs with PIL and tarfile and nothing else. Target ratio >= 0.85.
2. clips/s of `run_shard` vs a bare loop of one ffmpeg call per clip (same seek and filter chain) + tar.
   Target >= 0.85.
3. per stored clip (16 frames at --clip-res): bytes and loader decode time for npy and mp4.
Ray start-up is paid before timing: the stage pays it once per run, not per shard. The sharder is timed twice:
"cold" includes the Ray worker process importing the sharding code on its first task (~1 s, once per worker per
run), "warm" is the steady state that a real-size run (thousands of shards) sees.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ulcore.config import RayConfig, load_config  # noqa: E402
from ulcore.data.imagenet import center_crop  # noqa: E402
from ulcore.data.loaders import decode_sample  # noqa: E402
from ulcore.data.ray_init import ensure_ray  # noqa: E402
from ulcore.data.sharding import run_shard  # noqa: E402
from ulcore.data.video import decode_clip, encode_mp4, write_video  # noqa: E402


def make_images(root: Path, n: int) -> None:
    """ImageNet-like JPEGs: ~400x350 photos-ish content (noise + gradients), 4 classes."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "LOC_synset_mapping.txt").write_text("".join(f"n{c:08d} class {c}\n" for c in range(4)))
    for i in range(n):
        folder = root / "train" / f"n{i % 4:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = int(rng.integers(300, 500)), int(rng.integers(250, 400))
        yy, xx = np.mgrid[0:h, 0:w]
        arr = (np.sin(xx[..., None] / rng.uniform(5, 40) + np.arange(3)) * 80 + 128
               + rng.normal(0, 20, (h, w, 3)) + yy[..., None] / h * 40)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(folder / f"img_{i:05d}.JPEG", quality=90)


CLIP_SECONDS = 3


def make_clips(root: Path, n: int) -> None:
    """Kinetics layout: 3 s clips at 320x240, 30 fps, moving noise pattern."""
    (root / "annotations").mkdir(parents=True)
    folder = root / "videos" / "train"
    folder.mkdir(parents=True)
    rows = ["label,youtube_id,time_start,time_end,split"]
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (240, 400, 3), dtype=np.uint8)
    for i in range(n):
        frames = np.stack([base[:, t * 2 % 80: t * 2 % 80 + 320] for t in range(CLIP_SECONDS * 30)])
        write_video(frames, str(folder / f"clip{i:07d}_000000_{CLIP_SECONDS:06d}.mp4"), fps=30.0)
        rows.append(f"class {i % 3},clip{i:07d},0,{CLIP_SECONDS},train")
    (root / "annotations" / "train.csv").write_text("\n".join(rows) + "\n")


def bare_images(root: Path, out: Path, res: int) -> float:
    start = time.perf_counter()
    with tarfile.open(out, "w") as tar:
        for path in sorted(root.rglob("*.JPEG")):
            img = Image.open(path)
            img.load()
            buf = io.BytesIO()
            Image.fromarray(center_crop(img.convert("RGB"), res)).save(buf, format="PNG", compress_level=3)
            info = tarfile.TarInfo(path.stem + ".png")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    return time.perf_counter() - start


def bare_clips(root: Path, out: Path, res: int, frames: int, fps: float) -> float:
    start = time.perf_counter()
    vf = f"fps={fps},scale=w='if(lte(iw,ih),{res},-2)':h='if(lte(iw,ih),-2,{res})':flags=bicubic,crop={res}:{res}"
    seek = f"{(CLIP_SECONDS - frames / fps) / 2:.3f}"  # the centre of the clip, as video.clip_position=centre
    with tarfile.open(out, "w") as tar:
        for path in sorted(root.rglob("*.mp4")):
            raw = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-ss", seek, "-i", str(path), "-vf", vf,
                                  "-frames:v", str(frames), "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:"],
                                 capture_output=True, timeout=60, check=True).stdout
            buf = io.BytesIO()
            np.save(buf, np.frombuffer(raw, np.uint8).reshape(frames, res, res, 3))
            info = tarfile.TarInfo(path.stem + ".npy")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    return time.perf_counter() - start


def timed_shard(overrides: list[str]) -> tuple[float, int]:
    cfg = load_config(None, overrides)
    summary = run_shard(cfg)
    return summary["run"]["seconds"], sum(s["samples"] for s in summary["splits"].values())


def clip_storage(res: int, frames: int, repeats: int = 5) -> dict[str, tuple[float, float]]:
    """Bytes and median decode ms per stored clip for npy and mp4 (as the loader decodes them)."""
    rng = np.random.default_rng(1)
    base = rng.integers(0, 255, (res, res * 2, 3), dtype=np.uint8)
    clip = np.stack([base[:, t * 3: t * 3 + res] for t in range(frames)])
    npy = io.BytesIO()
    np.save(npy, clip)
    mp4 = encode_mp4(clip, fps=8.0)
    results = {}
    for name, sample in (("npy", {"npy": npy.getvalue()}), ("mp4", {"mp4": mp4})):
        sample.update({"__key__": "k", "cls": b"0", "json": f'{{"shape": [{frames}, {res}, {res}]}}'.encode()})
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            decode_sample(sample, "images")
            times.append(time.perf_counter() - t)
        results[name] = (len(sample[name]), statistics.median(times) * 1e3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--image-res", type=int, default=64)
    parser.add_argument("--clip-res", type=int, default=128)
    args = parser.parse_args()
    for key, value in {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                       "RAY_USAGE_STATS_ENABLED": "0"}.items():
        os.environ.setdefault(key, value)
    ensure_ray(RayConfig(num_cpus=1))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "imagenet", args.images)
        bare = bare_images(tmp / "imagenet", tmp / "bare.tar", args.image_res)
        for run in ("cold", "warm"):
            ours, n = timed_shard(["data.source=imagenet", f"data.root={tmp / 'imagenet'}",
                                   f"storage.root={tmp / ('o1-' + run)}", f"data.resolution={args.image_res}",
                                   "data.splits=[train]", "shard.samples_per_shard=100", "shard.max_parallel=1"])
            print(f"images  {args.image_res}px: sharder {n / ours:7.1f} img/s   bare loop {args.images / bare:7.1f} "
                  f"img/s   ratio {bare / ours * n / args.images:.2f}   (1 core, {run})")

        make_clips(tmp / "kinetics", args.clips)
        frames, fps = 16, 8.0
        bare = bare_clips(tmp / "kinetics", tmp / "bare-clips.tar", args.clip_res, frames, fps)
        common = ["data.source=kinetics", f"data.root={tmp / 'kinetics'}", f"data.resolution={args.clip_res}",
                  "data.splits=[train]", f"video.frames={frames}", f"model.frames={frames}",
                  "model.temporal_downsample=4", "data.random_flip=false", "shard.samples_per_shard=8",
                  "shard.max_parallel=1"]
        ours, n = timed_shard([*common, f"storage.root={tmp / 'o2'}"])
        print(f"clips  {args.clip_res}px: sharder {n / ours:7.1f} clip/s  bare loop {args.clips / bare:7.1f} clip/s"
              f"  ratio {bare / ours * n / args.clips:.2f}   (1 core, npy)")
        ours_mp4, _ = timed_shard([*common, f"storage.root={tmp / 'o3'}", "video.clip_format=mp4"])
        print(f"clips  {args.clip_res}px: sharder {n / ours_mp4:7.1f} clip/s with clip_format=mp4 (extra encode)")
        for name, (size, ms) in clip_storage(args.clip_res, frames).items():
            print(f"stored clip {frames}x{args.clip_res}^2 {name}: {size / 1024:8.1f} KiB  decode {ms:6.1f} ms"
                  f"  ({1000 / ms:7.1f} clips/s per loader worker)")


if __name__ == "__main__":
    main()
