"""ffmpeg I/O for clips: decode a source video to uint8 frames, and mp4 bytes <-> frames.

Every call is one ffmpeg process built with ffmpeg-python and run through `subprocess.run` with a timeout, so a
hung decoder costs at most `timeout_s` and its stdout/stderr are drained by `communicate` (a full stderr pipe
would otherwise block ffmpeg forever; ffmpeg-python's own `.run()` has no timeout). Failures come back as
`SampleError` with a reason the sharder counts: `timeout`, `undecodable` (ffmpeg's last error line kept as the
detail), `too_short`.
"""

from __future__ import annotations

import subprocess

import ffmpeg
import numpy as np

from ulcore.data.shards import SampleError

FFMPEG_GLOBAL = ("-nostdin", "-hide_banner", "-loglevel", "error")


def _run(args: list[str], *, source: str, timeout_s: float, stdin: bytes | None = None) -> bytes:
    try:
        done = subprocess.run(args, input=stdin, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise SampleError("timeout", f"{source}: ffmpeg ran longer than {timeout_s:g} s") from exc
    except OSError as exc:  # no ffmpeg binary: every clip would fail the same way, so say it plainly
        raise RuntimeError(f"cannot start ffmpeg ({exc}); install it (Debian: apt-get install ffmpeg)") from exc
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise SampleError("undecodable", f"{source}: ffmpeg exit {done.returncode}: {lines[-1] if lines else ''}")
    return done.stdout


def decode_clip(path: str, *, fps: float, resolution: int, frames: int, timeout_s: float,
                start_s: float = 0.0) -> np.ndarray:
    """`frames` frames at `fps` from `start_s` seconds in, short side resized to `resolution`, centre-cropped.

    Returns (T, R, R, 3) uint8. The fps filter resamples on presentation timestamps (drops/duplicates frames), so
    every clip ends up on the same time grid whatever its source rate (Kinetics mixes 24-60 fps and variable-rate
    uploads). `start_s` is an input seek (`-ss` before `-i`): ffmpeg jumps to the keyframe before it and decodes
    forward to the exact time, so only the frames kept are decoded, not the whole clip.
    """
    r = resolution
    stream = (
        ffmpeg.input(path, **({"ss": f"{start_s:.3f}"} if start_s > 0 else {}))
        .video.filter("fps", fps=fps)
        # short side -> r keeping aspect ratio (-2: the long side rounded to even), then the centre r x r
        .filter("scale", w=f"if(lte(iw,ih),{r},-2)", h=f"if(lte(iw,ih),-2,{r})", flags="bicubic")
        .filter("crop", r, r)
        .output("pipe:", format="rawvideo", pix_fmt="rgb24", vframes=frames)
    )
    raw = _run(list(stream.compile(cmd=["ffmpeg", *FFMPEG_GLOBAL])), source=path, timeout_s=timeout_s)
    got = len(raw) // (r * r * 3)
    if got == 0:
        raise SampleError("undecodable", f"{path}: ffmpeg produced no frames")
    if got < frames:
        raise SampleError("too_short", f"{path}: {got} frames at {fps:g} fps, need {frames}")
    return np.frombuffer(raw, np.uint8, count=frames * r * r * 3).reshape(frames, r, r, 3)


def encode_mp4(frames: np.ndarray, *, fps: float, timeout_s: float = 60.0, crf: int = 18,
               fragmented: bool = True) -> bytes:
    """(T, H, W, 3) uint8 -> H.264 mp4 bytes, written to a pipe.

    Fragmented mp4 (`empty_moov`) because plain mp4 needs a seekable output; yuv420p for player compatibility,
    which is also where most of the (small) loss comes from: compare decoded frames with a tolerance.
    """
    t, h, w, c = frames.shape
    if c != 3 or frames.dtype != np.uint8:
        raise ValueError(f"encode_mp4: expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    out_kwargs = {"format": "mp4", "vcodec": "libx264", "pix_fmt": "yuv420p", "crf": crf, "preset": "fast"}
    if fragmented:
        out_kwargs["movflags"] = "frag_keyframe+empty_moov"
    stream = (ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}", framerate=fps)
              .output("pipe:", **out_kwargs))
    return _run(list(stream.compile(cmd=["ffmpeg", *FFMPEG_GLOBAL])), source="<frames>", timeout_s=timeout_s,
                stdin=np.ascontiguousarray(frames).tobytes())


def write_video(frames: np.ndarray, path: str, *, fps: float, codec: str = "libx264",
                timeout_s: float = 60.0) -> None:
    """Frames to a real video file (mp4 / webm by extension): how the embedded and test sources are made."""
    t, h, w, _ = frames.shape
    out_kwargs = {"vcodec": codec, "pix_fmt": "yuv420p"}
    if codec == "libvpx":
        out_kwargs["b:v"] = "200k"
    stream = (ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}", framerate=fps)
              .output(path, **out_kwargs).overwrite_output())
    _run(list(stream.compile(cmd=["ffmpeg", *FFMPEG_GLOBAL])), source=path, timeout_s=timeout_s,
         stdin=np.ascontiguousarray(frames).tobytes())


def decode_mp4(data: bytes, *, shape: tuple[int, int, int], timeout_s: float = 60.0) -> np.ndarray:
    """mp4 bytes from `encode_mp4` -> (T, H, W, 3) uint8; `shape` = (T, H, W) as recorded in the sample's json."""
    t, h, w = shape
    stream = ffmpeg.input("pipe:", format="mp4").output("pipe:", format="rawvideo", pix_fmt="rgb24")
    raw = _run(list(stream.compile(cmd=["ffmpeg", *FFMPEG_GLOBAL])), source="<mp4 bytes>", timeout_s=timeout_s,
               stdin=data)
    if len(raw) < t * h * w * 3:
        raise SampleError("undecodable", f"<mp4 bytes>: {len(raw)} bytes of frames, expected {t}x{h}x{w}x3")
    return np.frombuffer(raw, np.uint8, count=t * h * w * 3).reshape(t, h, w, 3)


__all__ = ["decode_clip", "encode_mp4", "write_video", "decode_mp4", "FFMPEG_GLOBAL"]
