"""The shard format: one WebDataset tar per shard plus `<name>.stats.json`, both written atomically.

A shard is `<split>-{index:06d}.tar`; each sample is the tar members `<key>.<ext>` for its fields (webdataset
groups members by the key before the first dot, so keys never contain dots). The stats JSON is written only after
the tar is complete and doubles as the shard's done marker: a shard with stats is finished, one without is not,
whatever partial bytes an interrupted writer left behind (local temp files are dot-prefixed `.tmp` files that no
listing returns; on S3 an object is invisible until its upload completes).

Tars are byte-reproducible: members are sorted per sample and carry a fixed mtime/owner, so a rerun that
rewrites a shard from the same inputs produces the identical file.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import tempfile
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ulcore import layout, storage

SHARD_PATTERN = re.compile(r"^(?P<split>.+)-(?P<index>\d{6})\.tar$")
STATS_SUFFIX = ".stats.json"
# Keys of stats and summaries that say how a run went (timings; shards built, skipped or failed this time), never
# what it produced: a rerun that only skipped finished shards must leave every downstream identity unchanged.
RUN_STATS = frozenset({"run", "seconds"})
_KEY_OK = re.compile(r"^[A-Za-z0-9_\-+=@,%~]+$")


@dataclass(frozen=True)
class Item:
    """One listed input: its stable sample key, where it lives, its class index and what the sample json keeps."""

    key: str
    uri: str
    cls: int
    meta: tuple[tuple[str, Any], ...] = ()

    def info(self) -> dict[str, Any]:
        return dict(self.meta)


class SampleError(Exception):
    """One input could not become a sample: `reason` is a short counted category, `detail` names the file."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def stats_uri(shard_uri: str) -> str:
    """`.../train-000003.tar` -> `.../train-000003.stats.json`."""
    if not shard_uri.endswith(".tar"):
        raise ValueError(f"{shard_uri}: a shard URI must end in .tar")
    return shard_uri[: -len(".tar")] + STATS_SUFFIX


def safe_key(text: str) -> str:
    """A webdataset key from a source name, the same on every machine: dots (extension separators) and other odd
    ASCII characters become `_`; the name is NFC-normalised (macOS stores `é` decomposed, Linux as written) and
    each non-ASCII character becomes `_u<hex code point>`, so `café` -> `caf_u00e9` and `cafè` stays distinct."""
    text = unicodedata.normalize("NFC", text)
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", "".join(c if c.isascii() else f"_u{ord(c):04x}" for c in text))
    if not key:
        raise ValueError(f"{text!r}: nothing left to use as a sample key")
    return key


def encode_field(key: str, ext: str, value: Any) -> bytes:
    """Field value -> member bytes, by type (the same conventions webdataset's decoders read back)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"sample {key!r} field {ext!r}: booleans are ambiguous in a tar; store an int or json")
    if isinstance(value, (int, np.integer)):
        return str(int(value)).encode("ascii")
    if isinstance(value, np.ndarray):
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return buf.getvalue()
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True).encode("utf-8")
    raise TypeError(f"sample {key!r} field {ext!r}: cannot store a {type(value).__name__}")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed metadata: identical inputs give identical tar bytes
    info.mode = 0o444
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_tar(fileobj: Any, samples: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Stream samples into an open binary file as a tar; returns counts (samples, per-class) for the stats."""
    count = 0
    classes: Counter[str] = Counter()
    seen: set[str] = set()
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples:
            key = sample.get("__key__")
            if not isinstance(key, str) or not _KEY_OK.match(key):
                raise ValueError(f"sample key {key!r}: expected letters, digits, '_' or '-' (no dots or slashes)")
            if key in seen:
                raise ValueError(f"sample key {key!r} appears twice in one shard")
            seen.add(key)
            for ext in sorted(k for k in sample if not k.startswith("__")):
                _add_member(tar, f"{key}.{ext}", encode_field(key, ext, sample[ext]))
            if "cls" in sample:
                classes[str(int(sample["cls"]))] += 1
            count += 1
    return {"samples": count, "classes": dict(sorted(classes.items(), key=lambda kv: int(kv[0])))}


def write_shard(uri: str, samples: Iterable[dict[str, Any]], extra_stats: dict[str, Any] | None = None) -> dict:
    """Write one shard tar atomically, then its stats JSON (the done marker); returns the stats.

    `extra_stats` is merged after the samples are consumed, so a generator may fill it as it goes (the sharder
    records its rejected inputs that way).
    """
    start = time.perf_counter()
    name = os.path.basename(uri)
    if not SHARD_PATTERN.match(name):
        raise ValueError(f"{uri}: shard names look like <split>-000000.tar")
    if storage.is_s3(uri):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp")
    else:
        os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(uri)), prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            counts = write_tar(f, samples)
            f.flush()
            os.fsync(f.fileno())
        size = os.path.getsize(tmp)
        if storage.is_s3(uri):
            storage.upload_file(tmp, uri)
        else:
            storage.publish_local(tmp, uri)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    stats = {"shard": name, **counts, "bytes": size, "seconds": round(time.perf_counter() - start, 3)}
    stats.update(extra_stats or {})
    storage.write_json(stats_uri(uri), stats)
    return stats


def content_digest(doc: Any) -> str:
    """Identity of a stats or summary document: a hash of its JSON without the RUN_STATS keys, at any depth.
    Every stage input digest built from such a document goes through here."""

    def content(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: content(v) for k, v in value.items() if k not in RUN_STATS}
        if isinstance(value, list):
            return [content(v) for v in value]
        return value

    return layout.digest(content(doc))


def read_stats(shard_uri: str) -> dict[str, Any] | None:
    """The shard's stats, or None when the shard is not finished."""
    try:
        return storage.read_json(stats_uri(shard_uri))
    except FileNotFoundError:
        return None


def finished_shards(uris: Iterable[str], split: str | None = None) -> list[str]:
    """The finished shards (tar and stats both present) among a folder's listing, sorted by name."""
    files = set(uris)
    done = []
    for uri in sorted(files):
        match = SHARD_PATTERN.match(os.path.basename(uri))
        if match and (split is None or match["split"] == split) and stats_uri(uri) in files:
            done.append(uri)
    return done


def list_shards(folder: str, split: str | None = None) -> list[str]:
    """Finished shards (tar and stats both present) in `folder`, sorted by name."""
    return finished_shards(storage.list_uris(folder), split)


__all__ = ["Item", "SampleError", "shard_name", "stats_uri", "safe_key", "encode_field", "write_tar", "write_shard",
           "read_stats", "content_digest", "finished_shards", "list_shards", "SHARD_PATTERN", "STATS_SUFFIX",
           "RUN_STATS"]
