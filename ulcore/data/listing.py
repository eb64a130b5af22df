"""Listing a raw source folder: every file below it is a candidate sample, a reject with a reason, or ignored.

Both raw layouts (ImageNet class folders, Kinetics clip folders; local or s3://) are listed through `scan`, so a
copy that went through a Mac or Windows, a half-finished download or a stray symlink never stops the shard
stage and never loses a file silently:

- ignored (counted, not listed): any path with a hidden part - a dot-name (`.DS_Store`, `._x.JPEG`, `.git/`) or
  `__MACOSX/`, `Thumbs.db`, `desktop.ini` (any case) - which file managers leave behind and which hold no samples;
- rejected with a reason: `broken_link` (a symlink whose target is gone), `symlink_loop` (a folder link back to
  one of its own parents), `not_a_file` (a FIFO, socket or device), `unreadable` (a folder that cannot be listed,
  a file that cannot be stat'ed), `nested` (a file in a folder deeper than the layout has; that folder stands
  where files are expected), `unknown_extension` (not one of the layout's file types, in any case: `.JPEG` =
  `.jpeg`);
- every other file is a candidate, and the layout module turns it into a sample key (`shards.safe_key`).

Symlinked folders are followed (a class folder may live on another disk). Empty folders hold no file and are
not reported. Candidates come back sorted by URI, which is the order the "first one wins" rules of the layouts
refer to. `Listing` is what a layout's `list_split` returns: with `capped` (left out by `data.max_per_class`),
accepted + capped + rejected files + ignored = the files below the folder.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from ulcore import storage
from ulcore.data.shards import Item

IGNORED_NAMES = frozenset({"__macosx", "thumbs.db", "desktop.ini"})  # compared lower-cased


@dataclass(frozen=True)
class Listing:
    """One split of a raw source: the sorted items, the inputs rejected while listing, and the files skipped."""

    items: list[Item]
    rejects: list[dict] = field(default_factory=list)
    ignored: int = 0  # hidden files (file-manager metadata)
    capped: int = 0  # good inputs left out by data.max_per_class: a requested subset, not a defect


def relative(uri: str, base: str) -> str:
    """`uri` below `base` as a '/'-separated relative path (listings return base + rest: slice, no relpath)."""
    if storage.is_s3(base) or uri.startswith(base + os.sep):
        return uri[len(base):].lstrip("/" + os.sep).replace(os.sep, "/")
    return os.path.relpath(uri, base).replace(os.sep, "/")


def is_hidden(rel: str) -> bool:
    """A path with a dot-named or file-manager part (`.DS_Store`, `._x`, `__MACOSX/`, `Thumbs.db`)."""
    return any(part.startswith(".") or part.lower() in IGNORED_NAMES for part in rel.split("/"))


def walk_local(folder: str, parents: frozenset[str]) -> Iterator[tuple[str, tuple[str, str] | None]]:
    """(path, None) for each non-folder entry below `folder`, or (path, (reason, detail)) for what cannot be
    walked; symlinked folders are followed unless they lead back to one of `parents` (real paths)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        yield folder, ("unreadable", f"cannot list folder {folder}: {exc.strerror or exc}")
        return
    for entry in entries:
        try:
            is_folder = entry.is_dir()  # follows symlinks
        except OSError:  # a link cycle of files (ELOOP): the checks below report it as a broken link
            is_folder = False
        if not is_folder:
            yield entry.path, None
            continue
        real = os.path.realpath(entry.path)
        if real in parents:
            yield entry.path, ("symlink_loop", f"links back to its own parent folder {real}")
        else:
            yield from walk_local(entry.path, parents | {real})


def local_problem(path: str) -> tuple[str, str] | None:
    """Why a listed local path cannot be read as a file, or None."""
    try:
        mode = os.stat(path).st_mode  # follows symlinks
    except OSError as exc:
        if os.path.islink(path):
            return "broken_link", f"symlink to {os.readlink(path)!r}, which does not resolve ({exc.strerror})"
        return "unreadable", f"{exc.strerror or exc}"
    if not stat.S_ISREG(mode):
        return "not_a_file", "not a regular file (a FIFO, socket or device) where a file is expected"
    return None


def scan(base: str, extensions: tuple[str, ...], max_depth: int = 0, layout: str = ""
         ) -> tuple[list[str], list[dict], int]:
    """(candidate file URIs, rejects, number of ignored files) below the folder `base`, both lists sorted by URI.

    `extensions` are lower-case with the dot; `max_depth` > 0 rejects files more than that many path parts
    below `base` as `nested` (`layout` describes the expected layout in that message).
    """
    if storage.is_s3(base):
        found: Iterator[tuple[str, tuple[str, str] | None]] = ((u, None) for u in storage.list_uris(base))
    elif os.path.isdir(base):
        found = walk_local(base, frozenset({os.path.realpath(base)}))
    else:
        found = iter(())
    candidates: list[str] = []
    rejects: list[dict] = []
    ignored = 0
    for uri, problem in found:
        rel = relative(uri, base)
        if is_hidden(rel):
            ignored += 1
            continue
        if problem is None and not storage.is_s3(uri):
            problem = local_problem(uri)
        parts = rel.split("/")
        if problem is None and max_depth and len(parts) > max_depth:
            inner = "/".join(parts[:max_depth])
            problem = "nested", f"in a folder inside {inner}/, where files are expected ({layout})"
        ext = os.path.splitext(parts[-1])[1]
        if problem is None and ext.lower() not in extensions:
            problem = "unknown_extension", f"{ext or 'no extension'}: expected one of {' '.join(extensions)}"
        if problem is None:
            candidates.append(uri)
        else:
            rejects.append({"path": uri, "reason": problem[0], "detail": problem[1]})
    return sorted(candidates), sorted(rejects, key=lambda r: r["path"]), ignored


__all__ = ["IGNORED_NAMES", "Listing", "relative", "is_hidden", "walk_local", "local_problem", "scan"]
