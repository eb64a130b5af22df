"""The raw data as a versioned input: a manifest of `data.root` and its digest (the `raw_manifest` stage).

A manifest lists every file below the raw root by its '/'-separated relative key with its size and what changes
when it is rewritten: the ETag on S3 (from the listing itself, no request per object), `mtime_ns` on a local disk
(a touched file counts as changed, as for make and rsync). Files that hold no samples by the listing rules
(`.DS_Store`, `._*`, `__MACOSX/`, `Thumbs.db`: ulcore.data.listing) are left out, so a file manager cannot trigger a
reshard. An entry that cannot be read is kept with the reason instead of a size (`broken_link`, `symlink_loop`,
`not_a_file`, `unreadable`): the shard stage skips and counts it, and repairing it changes the digest. A missing
raw root is an error naming it.

The embedded sources have no raw files of their own: the shard stage generates them from the packaged asset, so
their manifest is the asset's sha256 and the build spec (ulcore.data.embedded.build_spec).

The digest (`layout.digest` of source, root and entries) changes exactly when a raw file is added, changed or
removed. Two places hold it:
- `data/raw_manifest.json` (this stage's output; the digest, counts and no entries): the shard stage's DVC
  dependency. The stage is `always_changed` in dvc.yaml, so `dvc repro` lists the raw root every time and reruns
  the shard stage only when the file's content, i.e. the raw data, changed;
- `data/shards/raw_manifest.json` (written by the shard stage, with every entry) and the shards' summary: what the
  shards were built from. Each shard's inputs digest includes its inputs' entries (`fingerprints`), so resharding
  rewrites only the shards whose inputs changed.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from ulcore import layout, storage
from ulcore.config import Config
from ulcore.data import embedded, listing

VERSION = 1  # bump when the entries change form


def raw_root(cfg: Config) -> str:
    """data.root, or <storage.root>/data/raw/<source> (where the embedded sources are generated)."""
    return cfg.data.root or layout.raw(cfg.storage.root, cfg.data.source)


def _local_entries(root: str) -> list[dict[str, Any]]:
    if not os.path.isdir(root):
        what = "a file, not a folder" if os.path.exists(root) else "no such folder"
        raise FileNotFoundError(f"data.root = {root!r}: {what} (expected the raw source's folder or s3:// prefix)")
    entries = []
    for path, problem in listing.walk_local(root, frozenset({os.path.realpath(root)})):
        key = listing.relative(path, root)
        if listing.is_hidden(key):
            continue
        problem = problem or listing.local_problem(path)
        if problem is not None:
            entries.append({"key": key, "unreadable": problem[0]})
            continue
        try:
            st = os.stat(path)
        except OSError:  # gone between the listing and the stat
            entries.append({"key": key, "unreadable": "unreadable"})
            continue
        entries.append({"key": key, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return entries


def _s3_entries(root: str) -> list[dict[str, Any]]:
    entries = [{"key": key, "size": size, "etag": etag} for uri, size, etag in storage.list_objects(root)
               if not listing.is_hidden(key := listing.relative(uri, root))]
    if not entries:
        raise FileNotFoundError(f"data.root = {root!r}: no objects below this prefix (expected the raw source)")
    return entries


def raw_manifest(cfg: Config) -> dict[str, Any]:
    """{source, root, version, files, bytes, digest, entries} of the configured raw source, entries sorted by key."""
    root = raw_root(cfg)
    doc: dict[str, Any] = {"source": cfg.data.source, "root": root, "version": VERSION}
    if cfg.data.source.startswith("embedded"):
        doc["embedded"] = {"asset_sha256": hashlib.sha256(embedded.ASSET.read_bytes()).hexdigest(),
                           "build": embedded.build_spec(cfg)}
        entries: list[dict[str, Any]] = []
    else:
        entries = _s3_entries(root) if storage.is_s3(root) else _local_entries(root)
        entries.sort(key=lambda e: e["key"])
    doc["digest"] = layout.digest({**doc, "entries": entries})
    doc["files"] = len(entries)
    doc["bytes"] = sum(e.get("size", 0) for e in entries)
    return {**doc, "entries": entries}


def fingerprints(manifest: dict[str, Any]) -> dict[str, str]:
    """Relative key -> what identifies that file's version (size and ETag or mtime_ns, or why it is unreadable)."""
    return {e["key"]: "/".join(str(e[k]) for k in ("size", "etag", "mtime_ns", "unreadable") if k in e)
            for e in manifest["entries"]}


def record(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest without its entries: what data/raw_manifest.json and the shards' summary hold."""
    return {k: v for k, v in manifest.items() if k != "entries"}


def run_raw_manifest(cfg: Config) -> dict[str, Any]:
    """The `raw_manifest` stage: list the raw root, write data/raw_manifest.json when its content changed."""
    storage.use_endpoint(cfg.storage.s3_endpoint, cfg.storage.unreachable_after_s)
    doc = record(raw_manifest(cfg))
    uri = layout.raw_manifest(cfg.storage.root)
    try:
        changed = storage.read_json(uri) != doc
    except (FileNotFoundError, ValueError):
        changed = True
    if changed:
        storage.write_json(uri, doc)
    print(f"[raw_manifest] {doc['root']}: {doc['files']} files, {doc['bytes']} bytes, digest {doc['digest']} "
          f"({'changed' if changed else 'unchanged'})", flush=True)
    return {**doc, "changed": changed}



__all__ = ["VERSION", "raw_root", "raw_manifest", "fingerprints", "record", "run_raw_manifest"]
