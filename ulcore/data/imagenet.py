"""The ImageNet (ILSVRC2012) source: listing the folder layout and turning one file into one image sample.

Layout (local folder or s3:// prefix):
    LOC_synset_mapping.txt           "n01440764 tench, Tinca tinca" per line; line order = class index
    train/<wnid>/<name>.JPEG
    val/<wnid>/<name>.JPEG           or flat val/<name>.JPEG labelled by
    LOC_val_solution.csv             ImageId,PredictionString ("n01751748 x0 y0 x1 y1 ...": first token = wnid)

Listing (ulcore.data.listing): hidden files (`.DS_Store`, `._*`, `__MACOSX/`, `Thumbs.db`) are ignored; files in a
folder inside a class folder, with an extension other than .jpeg/.jpg/.png/.webp/.bmp (any case), broken links
and the like are rejected with their reason. A sample's key is its file name without the extension through
`safe_key` (`n01440764_10026.JPEG` -> `n01440764_10026`); two files with the same key (`a.JPEG` and `a.jpeg`,
`a b.png` and `a_b.png`, or one name in two class folders) keep the first in URI order, the later ones are
rejected as `duplicate_key` naming it.

Real ImageNet holds CMYK and greyscale JPEGs and a PNG named .JPEG; all decode through PIL (which sniffs the
format, not the extension) and become RGB. Resizing is ADM's centre crop (guided-diffusion `center_crop_arr`):
halve with a box filter while the short side is >= 2x the target (cheap, alias-free), one bicubic resize of the
short side to the target, then the central square.
"""

from __future__ import annotations

import csv
import io
import os
import warnings

import numpy as np
from PIL import Image

from ulcore import storage
from ulcore.data import listing
from ulcore.data.shards import Item, SampleError, safe_key

SYNSET_MAPPING = "LOC_synset_mapping.txt"
VAL_SOLUTION = "LOC_val_solution.csv"
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".webp", ".bmp")  # PIL sniffs the real format from the bytes
LAYOUT = "{split}/<wnid>/<image> or a flat {split}/<image>"


def read_classes(root: str, train_split: str = "train") -> list[tuple[str, str]]:
    """[(wnid, name)] in class-index order: the synset mapping when present, else the sorted train folders that
    hold images."""
    mapping = storage.join(root, SYNSET_MAPPING)
    if storage.exists(mapping):
        classes = []
        for number, line in enumerate(storage.read_text(mapping).splitlines(), 1):
            if not line.strip():
                continue
            wnid, _, name = line.strip().partition(" ")
            if not wnid:
                raise ValueError(f"{mapping}:{number}: expected '<wnid> <class name>', got {line!r}")
            classes.append((wnid, name.strip() or wnid))
        return classes
    base = storage.join(root, train_split)
    images, _, _ = listing.scan(base, IMAGE_EXTENSIONS, max_depth=2)
    wnids = sorted({rel.split("/")[0] for rel in (listing.relative(u, base) for u in images) if "/" in rel})
    if not wnids:
        raise ValueError(f"{root}: neither {SYNSET_MAPPING} nor class folders under {train_split}/ to define classes")
    return [(w, w) for w in wnids]


def _val_solution(root: str) -> dict[str, str]:
    """ImageId -> wnid from LOC_val_solution.csv (empty when the file is absent)."""
    uri = storage.join(root, VAL_SOLUTION)
    if not storage.exists(uri):
        return {}
    rows = csv.DictReader(io.StringIO(storage.read_text(uri)))
    if not rows.fieldnames or not {"ImageId", "PredictionString"} <= set(rows.fieldnames):
        raise ValueError(f"{uri}: expected columns ImageId,PredictionString, got {rows.fieldnames}")
    return {r["ImageId"].strip(): (r["PredictionString"] or "").split()[0] for r in rows if r["PredictionString"]}


def list_split(root: str, split: str, classes: list[tuple[str, str]], max_per_class: int = 0
               ) -> listing.Listing:
    """Items of one split sorted by URI, and what listing rejected (see ulcore.data.listing; here also unknown
    class, no label, duplicate key, labelled but absent) or ignored.

    A key is `safe_key` of the file name without its extension; when two files give the same key, the first in
    URI order keeps it and each later one is rejected as `duplicate_key`, naming the first.
    """
    index = {wnid: i for i, (wnid, _) in enumerate(classes)}
    base = storage.join(root, split)
    uris, rejects, ignored = listing.scan(base, IMAGE_EXTENSIONS, max_depth=2, layout=LAYOUT.format(split=split))
    if not uris and not rejects:
        raise ValueError(f"{base}: no files for split {split!r} (expected {LAYOUT.format(split=split)}"
                         f"{f'; {ignored} hidden files ignored' if ignored else ''})")
    solution: dict[str, str] | None = None
    items: list[Item] = []
    owner: dict[str, str] = {}  # key -> the URI that took it
    per_class: dict[int, int] = {}
    capped = 0
    for uri in uris:
        rel = listing.relative(uri, base)
        stem = os.path.splitext(rel.split("/")[-1])[0]
        if "/" in rel:
            wnid = rel.split("/")[0]
        else:  # flat val layout: labels come from the solution file
            if solution is None:
                solution = _val_solution(root)
            wnid = solution.get(stem, "")
            if not wnid:
                rejects.append({"path": uri, "reason": "unlabelled", "detail": f"{stem} not in {VAL_SOLUTION}"})
                continue
        if wnid not in index:
            rejects.append({"path": uri, "reason": "unknown_class", "detail": f"{wnid} not in {SYNSET_MAPPING}"})
            continue
        key = safe_key(stem)
        if key in owner:
            rejects.append({"path": uri, "reason": "duplicate_key",
                            "detail": f"key {key} already taken by {owner[key]} (the first in URI order keeps it)"})
            continue
        owner[key] = uri
        cls = index[wnid]
        if max_per_class and per_class.get(cls, 0) >= max_per_class:
            capped += 1  # a requested subset, not a defect: counted in the summary as 'capped', not rejected
            continue
        per_class[cls] = per_class.get(cls, 0) + 1
        items.append(Item(key, uri, cls, (("source", f"{split}/{rel}"), ("synset", wnid))))
    if solution:  # labelled files that are not there: real downloads lose some
        present = {os.path.splitext(os.path.basename(u))[0] for u in uris}
        for image_id in sorted(set(solution) - present):
            rejects.append({"path": storage.join(base, image_id + ".JPEG"), "reason": "missing",
                            "detail": f"listed in {VAL_SOLUTION}, file absent"})
    return listing.Listing(items, rejects, ignored, capped)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha over white, 16-bit scaled down, CMYK/greyscale/palette converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def center_crop(image: Image.Image, resolution: int) -> np.ndarray:
    """ADM centre crop: box-halve while short side >= 2R, bicubic short side -> R, central R x R (H, W, 3)."""
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    return arr[top:top + resolution, left:left + resolution]


def decode_image(data: bytes, source: str) -> Image.Image:
    """Bytes -> fully decoded PIL image, or SampleError(empty | truncated | undecodable | too_large)."""
    if not data:
        raise SampleError("empty", f"{source}: zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()  # decode now: a truncated file only fails here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SampleError("too_large", f"{source}: {exc}") from exc
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad bytes
        reason = "truncated" if "truncat" in str(exc).lower() else "undecodable"
        raise SampleError(reason, f"{source}: {type(exc).__name__}: {exc}") from exc
    return image


def encode_image(arr: np.ndarray, image_format: str) -> tuple[str, bytes]:
    """(H, W, 3) uint8 -> (field name, lossless bytes). PNG level 3: near level-9 size at a fraction of the time."""
    buf = io.BytesIO()
    if image_format == "png":
        Image.fromarray(arr).save(buf, format="PNG", compress_level=3)
    elif image_format == "webp":
        Image.fromarray(arr).save(buf, format="WEBP", lossless=True, quality=80, method=4)
    else:
        raise ValueError(f"shard.image_format = {image_format!r}: expected png or webp")
    return image_format, buf.getvalue()


def make_sample(item: Item, *, resolution: int, image_format: str) -> dict:
    """One listed image -> a shard sample {__key__, png|webp, cls, json}, or SampleError with the reason."""
    try:
        data = storage.read_bytes(item.uri)
    except FileNotFoundError as exc:
        raise SampleError("missing", f"{item.uri}: file vanished after listing") from exc
    except OSError as exc:
        raise SampleError("read_error", f"{item.uri}: {exc}") from exc
    image = decode_image(data, item.uri)
    original = {"size": list(image.size), "mode": image.mode, "format": image.format or ""}
    ext, payload = encode_image(center_crop(to_rgb(image), resolution), image_format)
    return {"__key__": item.key, ext: payload, "cls": item.cls, "json": {**item.info(), **original}}


__all__ = ["SYNSET_MAPPING", "VAL_SOLUTION", "IMAGE_EXTENSIONS", "read_classes", "list_split", "to_rgb", "center_crop",
           "decode_image", "encode_image", "make_sample"]
