"""The Kinetics(-600) source: listing annotation CSVs against the clips on disk, one clip -> one video sample.

Layout (local folder or s3:// prefix), names configurable because releases differ (`val` vs `validate`):
    annotations/<video.annotations[split]>         CSV: label,youtube_id,time_start,time_end,split
    videos/<video.video_dirs[split]>/[<any folders>/]<youtube_id>_<start:06d>_<end:06d>.<mp4|webm|mkv|mov|avi>

Class index = position in the sorted set of labels over every configured annotation file, so train and val agree
whichever splits one run shards. Listing accounts for every file and every row: hidden files are ignored and
stray ones rejected (ulcore.data.listing); real downloads miss many listed clips, rejected as `missing`; a file no
row names is rejected as `unannotated` (a `.part` left by a downloader as `unknown_extension`). Rows are taken in
sorted clip-name order, so when two names give one key (`safe_key`) the first keeps it and the later one is
rejected as `duplicate_key` naming it; a clip present in two containers keeps the preferred one.

The `video.frames` frames are cut from the centre of the annotated segment (`video.clip_position: centre`;
Kinetics clips are the 10 s around the labelled action, so the centre is where it is most likely to be), located
from the annotation's own time_end - time_start without probing the file; a file shorter than its annotation says
falls back to a cut from its start, and only a file too short for even that is rejected (`too_short`).
`clip_position: start` always cuts from the first frame.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile

import numpy as np

from ulcore import storage
from ulcore.config import Config
from ulcore.data import listing
from ulcore.data.shards import Item, SampleError, safe_key
from ulcore.data.video import decode_clip, encode_mp4

COLUMNS = ("label", "youtube_id", "time_start", "time_end")
EXT_PREFERENCE = (".mp4", ".webm", ".mkv", ".mov", ".avi")  # clip files (any case); a clip in several: the first


def annotation_uri(root: str, cfg: Config, split: str) -> str:
    if split not in cfg.video.annotations:
        raise ValueError(f"video.annotations has no entry for split {split!r} (have: {sorted(cfg.video.annotations)})")
    return storage.join(root, "annotations", cfg.video.annotations[split])


def read_rows(uri: str) -> list[dict[str, str]]:
    """Annotation rows; labels keep their spaces, parentheses and quotes (the csv module handles quoting)."""
    try:
        text = storage.read_text(uri)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{uri}: annotation file not found (see video.annotations)") from exc
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{uri}: missing columns {missing}; expected {','.join(COLUMNS)},split")
    return list(reader)


def read_classes(root: str, cfg: Config) -> list[str]:
    labels: set[str] = set()
    for split in sorted(cfg.video.annotations):
        uri = annotation_uri(root, cfg, split)
        if storage.exists(uri):
            labels.update(r["label"].strip() for r in read_rows(uri) if (r["label"] or "").strip())
    if not labels:
        raise ValueError(f"{storage.join(root, 'annotations')}: no labelled rows in any of "
                         f"{sorted(cfg.video.annotations.values())}")
    return sorted(labels)


def clip_stem(youtube_id: str, start: str, end: str) -> str:
    """`<youtube_id>_<start:06d>_<end:06d>` as the Kinetics download scripts name clips."""
    return f"{youtube_id}_{int(float(start)):06d}_{int(float(end)):06d}"


def list_split(root: str, cfg: Config, split: str, classes: list[str]) -> listing.Listing:
    """Items sorted by key, and what listing rejected or ignored (see the module docstring and
    ulcore.data.listing): every file below the split's video folder and every annotation row is accounted for."""
    ann = annotation_uri(root, cfg, split)
    if split not in cfg.video.video_dirs:
        raise ValueError(f"video.video_dirs has no entry for split {split!r} (have: {sorted(cfg.video.video_dirs)})")
    folder = storage.join(root, "videos", cfg.video.video_dirs[split])
    uris, rejects, ignored = listing.scan(folder, EXT_PREFERENCE)
    rank = {ext: i for i, ext in enumerate(EXT_PREFERENCE)}
    on_disk: dict[str, str] = {}
    for uri in sorted(uris, key=lambda u: (rank[os.path.splitext(u)[1].lower()], u)):
        stem = os.path.splitext(os.path.basename(uri))[0]
        if stem in on_disk:
            rejects.append({"path": uri, "reason": "duplicate_key", "detail": f"same clip as {on_disk[stem]}, kept "
                            f"(containers in the order {' '.join(EXT_PREFERENCE)}, then URI order)"})
        else:
            on_disk[stem] = uri
    rows = []
    for number, row in enumerate(read_rows(ann), 2):  # line 1 is the header
        where = f"{ann}:{number}"
        try:
            rows.append((clip_stem(row["youtube_id"].strip(), row["time_start"], row["time_end"]), where, row))
        except (ValueError, TypeError, AttributeError):
            rejects.append({"path": where, "reason": "bad_row", "detail": f"unreadable times in {row}"})
    rows.sort(key=lambda r: r[0])  # stable: a repeated clip keeps its first row; the first name wins a key
    index = {label: i for i, label in enumerate(classes)}
    items: dict[str, Item] = {}
    claimed: set[str] = set()  # clip names a row has accounted for
    for stem, where, row in rows:
        if stem in claimed:
            rejects.append({"path": where, "reason": "duplicate_key", "detail": f"row repeats {stem}"})
            continue
        claimed.add(stem)
        if stem not in on_disk:  # a row, not a file: the expected path names what is absent
            rejects.append({"path": storage.join(folder, stem + ".mp4"), "reason": "missing",
                            "detail": f"{where}: no usable {stem}.* in {folder}"})
            continue
        path = on_disk[stem]
        label = (row["label"] or "").strip()
        if not label:
            rejects.append({"path": path, "reason": "unlabelled", "detail": f"{where}: empty label"})
            continue
        if label not in index:
            rejects.append({"path": path, "reason": "unknown_class", "detail": f"{where}: label {label!r}"})
            continue
        key = safe_key(stem)
        if key in items:
            rejects.append({"path": path, "reason": "duplicate_key",
                            "detail": f"{where}: key {key} already taken by {items[key].uri}"})
            continue
        meta = (("source", path[len(root):].lstrip("/")), ("label", label),
                ("youtube_id", row["youtube_id"].strip()), ("time_start", int(float(row["time_start"]))),
                ("time_end", int(float(row["time_end"]))))
        items[key] = Item(key, path, index[label], meta)
    for stem in sorted(set(on_disk) - claimed):
        rejects.append({"path": on_disk[stem], "reason": "unannotated", "detail": f"no row of {ann} names {stem}"})
    kept = []
    per_class: dict[int, int] = {}
    capped = 0
    for key in sorted(items):
        cls = items[key].cls
        if cfg.data.max_per_class and per_class.get(cls, 0) >= cfg.data.max_per_class:
            capped += 1
            continue
        per_class[cls] = per_class.get(cls, 0) + 1
        kept.append(items[key])
    return listing.Listing(kept, rejects, ignored, capped)


def clip_start(item: Item, cfg: Config) -> float:
    """Seconds into the file where the cut begins: centred in the annotated segment, or 0."""
    if cfg.video.clip_position == "start":
        return 0.0
    meta = item.info()
    duration = float(meta.get("time_end", 0)) - float(meta.get("time_start", 0))
    return max(0.0, (duration - cfg.video.frames / cfg.video.fps) / 2)


def make_sample(item: Item, *, cfg: Config) -> dict:
    """One clip -> {__key__, npy|mp4, cls, json} at video.fps / data.resolution / video.frames, or SampleError."""
    v, r = cfg.video, cfg.data.resolution
    with tempfile.TemporaryDirectory(prefix="ul-clip-") as tmp:
        path = item.uri
        if storage.is_s3(item.uri):  # ffmpeg needs a seekable file: an mp4's index may sit at its end
            path = os.path.join(tmp, "clip" + os.path.splitext(item.uri)[1])
            try:
                storage.download_file(item.uri, path)
            except FileNotFoundError as exc:
                raise SampleError("missing", f"{item.uri}: object vanished after listing") from exc
        try:
            size = os.path.getsize(path)
        except FileNotFoundError as exc:
            raise SampleError("missing", f"{item.uri}: file vanished after listing") from exc
        if size == 0:
            raise SampleError("empty", f"{item.uri}: zero bytes")
        start_s = clip_start(item, cfg)
        try:
            frames = decode_clip(path, fps=v.fps, resolution=r, frames=v.frames, timeout_s=v.ffmpeg_timeout_s,
                                 start_s=start_s)
        except SampleError as exc:
            if start_s == 0 or exc.reason not in ("too_short", "undecodable"):
                raise
            start_s = 0.0  # shorter than annotated (seeking past its end gives no frames): cut from its start
            frames = decode_clip(path, fps=v.fps, resolution=r, frames=v.frames, timeout_s=v.ffmpeg_timeout_s)
    info = {**item.info(), "shape": [v.frames, r, r], "fps": v.fps, "bytes": size, "start_s": round(start_s, 3)}
    if v.clip_format == "npy":
        return {"__key__": item.key, "npy": np.ascontiguousarray(frames), "cls": item.cls, "json": info}
    payload = encode_mp4(frames, fps=v.fps, timeout_s=v.ffmpeg_timeout_s)
    return {"__key__": item.key, "mp4": payload, "cls": item.cls, "json": info}


__all__ = ["COLUMNS", "annotation_uri", "read_rows", "read_classes", "clip_stem", "list_split", "clip_start",
           "make_sample"]
