"""Streaming readers for image, video and latent shards (local or s3://), as batches of tensors.

Training streams are infinite and resampled (webdataset's advice for DDP: no epoch boundary where ranks can
disagree on batch counts and deadlock a collective). Each rank draws only from its own slice `uris[rank::world]`,
so ranks see disjoint samples; decoding to uint8 happens in the DataLoader workers and the float conversion
(`to_float`) on the training side, where it is cheapest (uint8 crosses the worker pipe at a quarter of the size).
Evaluation is one exact pass in a fixed order in the calling process.

Unreadable data is never dropped silently: every reader counts the shards it cannot read and the samples it cannot
decode (`ReadErrors`), warns naming each one, and stops with CorruptDataError naming the file once either count
passes its limit (`data.max_bad_shards`, `data.max_bad_samples`; 0 by default: the first one stops the stage).
Training batches carry the counts so far (`bad_shards`, `bad_samples`) for the stage's status line, metrics and
MLflow.

Batches: {"x": uint8 (B,3,H,W) | (B,3,T,H,W), "cls": int64 (B,), "key": [str]} for images/videos and
{"z": float32 (B,C,h,w), "cls", "key"} for latents.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from ulcore import layout, storage
from ulcore.config import Config
from ulcore.data.shards import list_shards, read_stats
from ulcore.data.video import decode_mp4
from ulcore.errors import CorruptDataError

log = logging.getLogger(__name__)

KINDS = {"images": layout.shards, "latents": layout.latents}  # kind -> (storage.root, split) -> its shards' folder
SHUFFLE_BUFFER = 1000  # samples held per worker for shuffling; ~3 MB of 32x32 PNGs, ~800 MB of 128² npy clips
VIDEO_SHUFFLE_BUFFER = 64


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> Any:
    """webdataset has no s3:// opener; stream the object through boto3 (endpoint from AWS_ENDPOINT_URL)."""
    if "r" not in mode:
        raise ValueError(f"{url}: s3:// shards are read-only here (write them with ulcore.data.shards.write_shard)")
    return storage.open_read(url)


wds.gopen_schemes["s3"] = _gopen_s3


def shard_uris(cfg: Config, kind: str, split: str) -> list[str]:
    """Finished, non-empty shards of `kind` ("images" covers video clips too, "latents") for `split`, sorted."""
    if kind not in KINDS:
        raise ValueError(f"kind = {kind!r}: expected one of {sorted(KINDS)}")
    storage.use_endpoint(cfg.storage.s3_endpoint)
    folder = KINDS[kind](cfg.storage.root, split)
    # a shard whose every input was rejected is finished but empty: a reader drawing it would only spin
    uris = [u for u in list_shards(folder, split) if (read_stats(u) or {}).get("samples", 1) > 0]
    if not uris:
        stage = "shard" if kind == "images" else "encode"
        raise FileNotFoundError(f"{folder}: no finished {split} shards (tar + stats.json); run the {stage} stage first")
    return uris


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return x.to(torch.float32) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8, rounded and clipped (model outputs overshoot)."""
    return ((x.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def decode_sample(sample: dict[str, Any], kind: str) -> dict[str, Any]:
    """Tar members -> {"x" | "z": array, "cls": int, "key": str}; raises ValueError naming the sample if unusable."""
    key = sample.get("__key__", "?")
    where = f"{sample.get('__url__', '?')}:{key}"
    try:
        cls = int(sample["cls"])
        if kind == "latents":
            return {"z": np.load(io.BytesIO(sample["npy"]), allow_pickle=False).astype(np.float32), "cls": cls,
                    "key": key}
        if "png" in sample or "webp" in sample:
            data = sample.get("png") or sample["webp"]
            x = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)  # (3, H, W)
        elif "npy" in sample:
            x = np.load(io.BytesIO(sample["npy"]), allow_pickle=False).transpose(3, 0, 1, 2)  # (3, T, H, W)
        elif "mp4" in sample:
            t, h, w = json.loads(sample["json"])["shape"]
            x = decode_mp4(sample["mp4"], shape=(t, h, w)).transpose(3, 0, 1, 2)
        else:
            raise KeyError(f"no png/webp/npy/mp4 member (has {sorted(k for k in sample if not k.startswith('__'))})")
    except Exception as exc:
        raise ValueError(f"{where}: cannot decode sample ({type(exc).__name__}: {exc})") from exc
    if x.dtype != np.uint8:
        raise ValueError(f"{where}: expected uint8 pixels, got {x.dtype}")
    return {"x": np.ascontiguousarray(x), "cls": cls, "key": key}


class ReadErrors:
    """The unreadable shards and samples one reader met: each warned about once, counted, and fatal past a limit."""

    def __init__(self, max_bad_shards: int = 0, max_bad_samples: int = 0) -> None:
        self.limits = {"shard": max_bad_shards, "sample": max_bad_samples}
        self.seen: dict[str, dict[str, str]] = {"shard": {}, "sample": {}}  # kind -> where -> first error

    def counts(self) -> dict[str, int]:
        return {"bad_shards": len(self.seen["shard"]), "bad_samples": len(self.seen["sample"])}

    def _record(self, kind: str, where: str, error: str) -> None:
        found = self.seen[kind]
        if where in found:  # a resampled stream draws the same broken shard again: counted once
            return
        found[where] = error
        limit = self.limits[kind]
        if len(found) > limit:
            raise CorruptDataError(f"{where}: unreadable {kind} ({error}); {len(found)} unreadable {kind}(s) > "
                                   f"data.max_bad_{kind}s = {limit}: rebuild it (delete it and its .stats.json, "
                                   f"rerun the stage that wrote it) or raise data.max_bad_{kind}s")
        log.warning("skipping unreadable %s %s (%s); %d of data.max_bad_%ss = %d so far", kind, where, error,
                    len(found), kind, limit)

    def shard_error(self, exn: Exception) -> bool:
        """webdataset handler for shards that cannot be opened or untarred; the shard's URL is its last arg."""
        where = exn.args[-1] if exn.args and isinstance(exn.args[-1], str) else "?"
        detail = next((str(a) for a in exn.args if isinstance(a, str) and a != where), "")
        self._record("shard", where, f"{type(exn).__name__}: {detail}".rstrip(": "))
        return True

    def sample_error(self, exc: ValueError) -> None:
        where, _, error = str(exc).partition(": ")
        self._record("sample", where, error)


def _decoded(source: Iterator[dict], kind: str, errors: ReadErrors) -> Iterator[dict]:
    for sample in source:
        try:
            yield decode_sample(sample, kind)
        except ValueError as exc:
            errors.sample_error(exc)


def _with_counts(source: Iterator[dict], errors: ReadErrors) -> Iterator[dict]:
    for batch in source:
        yield {**batch, **errors.counts()}


def _worker_rng(seed: int, rank: int) -> random.Random:
    info = torch.utils.data.get_worker_info()
    worker = info.id if info is not None else 0
    return random.Random(f"{seed}/{rank}/{worker}")


def _shuffled_flipped(source: Iterator[dict], *, seed: int, rank: int, flip: bool) -> Iterator[dict]:
    """Buffer shuffle + random horizontal flip, seeded per (seed, rank, worker) so runs are reproducible."""
    rng = _worker_rng(seed, rank)
    held: list[dict] = []
    buffer = SHUFFLE_BUFFER

    def pick() -> dict:
        out = held.pop(rng.randrange(len(held)))
        if flip and "x" in out and rng.random() < 0.5:
            out["x"] = np.ascontiguousarray(out["x"][..., ::-1])  # last axis is W for images and clips
        return out

    for sample in source:
        if not held and "x" in sample and sample["x"].ndim == 4:
            buffer = VIDEO_SHUFFLE_BUFFER  # clips are ~100x an image: keep worker memory bounded
        held.append(sample)
        if len(held) >= buffer:
            yield pick()
    while held:
        yield pick()


def collate(samples: list[dict]) -> dict[str, Any]:
    field = "z" if "z" in samples[0] else "x"
    return {field: torch.from_numpy(np.stack([s[field] for s in samples])),
            "cls": torch.tensor([s["cls"] for s in samples], dtype=torch.int64),
            "key": [s["key"] for s in samples]}


def _rank_slice(uris: list[str], rank: int, world_size: int, workers: int) -> list[str]:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank = {rank}: expected 0 <= rank < world_size = {world_size}")
    mine = list(uris)[rank::world_size]
    need = world_size * max(workers, 1)
    if len(uris) < need:
        raise ValueError(f"{len(uris)} shards for {world_size} rank(s) x {max(workers, 1)} loader worker(s): every "
                         f"reader needs at least one shard (else it idles and DDP hangs). Write >= {need} shards "
                         "(lower shard.samples_per_shard) or use fewer workers/ranks")
    return mine


def train_batches(uris: list[str], *, batch_size: int, rank: int, world_size: int, seed: int, kind: str,
                  flip: bool, num_workers: int = 1, max_bad_shards: int = 0,
                  max_bad_samples: int = 0) -> Iterator[dict[str, Any]]:
    """Infinite stream of per-rank batches of `batch_size`, resampled from this rank's disjoint shard slice; each
    batch also carries this reader's `bad_shards` and `bad_samples` so far (per loader worker)."""
    if kind not in KINDS:
        raise ValueError(f"kind = {kind!r}: expected one of {sorted(KINDS)}")
    mine = _rank_slice(uris, rank, world_size, num_workers)
    errors = ReadErrors(max_bad_shards, max_bad_samples)
    pipeline = wds.DataPipeline(
        # rank folded into the seed: the worker seed webdataset adds only sees ranks set up by torch.distributed
        wds.ResampledShards(mine, seed=seed * 1_000_003 + rank, deterministic=True),
        wds.tarfile_to_samples(handler=errors.shard_error),
        lambda src: _decoded(src, kind, errors),
        lambda src: _shuffled_flipped(src, seed=seed, rank=rank, flip=flip),
        wds.batched(batch_size, collation_fn=collate, partial=False),
        lambda src: _with_counts(src, errors),
    )
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers,
                           persistent_workers=num_workers > 0)
    while True:  # the resampled stream never ends; the loop only guards against a worker restart
        yield from loader


def eval_batches(uris: list[str], *, batch_size: int, rank: int = 0, world_size: int = 1,
                 kind: str) -> Iterator[dict[str, Any]]:
    """One exact pass over this rank's shard slice, in shard and file order; the last batch may be short.

    Ranks can get different batch counts: gather results after the loop rather than per batch. A pass that must
    see every sample stops at the first unreadable shard or sample, naming it.
    """
    if kind not in KINDS:
        raise ValueError(f"kind = {kind!r}: expected one of {sorted(KINDS)}")
    mine = _rank_slice(uris, rank, world_size, 1)
    errors = ReadErrors()
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(mine),
        wds.tarfile_to_samples(handler=errors.shard_error),
        lambda src: _decoded(src, kind, errors),
        wds.batched(batch_size, collation_fn=collate, partial=True),
    )
    yield from pipeline


__all__ = ["shard_uris", "train_batches", "eval_batches", "to_float", "to_uint8", "decode_sample", "collate",
           "ReadErrors"]
