"""The `reference` stage: FID statistics of the real images that evaluations compare with, computed once per
dataset version and kept in data/fid_refs/ (a DVC output, so `dvc push` shares them and nobody recomputes them).

The references the evaluate stage reads (evaluate.py states the protocol):
- gFID: the first `eval.reference_samples` images of the training split (0 = the whole split);
- rFID: the first `eval.num_samples` held-out images, the ones the evaluation reconstructs;
- the FID floor: the first `eval.num_samples` training images against the rFID reference - real against real at
  the N of gFID, what a perfect generator would score there (FID is biased upwards at small N). Its value is
  cached next to the two statistics (`fid_floor`).
Each is keyed by (split, resolution, frames, FID-network sha256, N, shard fingerprint) and stored under the key's
hash (fid.reference_key); a key already stored is not computed again. They depend on the data and the FID network
only, never on a model, so the pipeline computes them right after sharding: a missing or broken FID network fails
the run before any training, and each evaluation after it does only model work. The evaluate stage computes a
missing reference itself, so it also runs on its own.

At scale this is the pass over the whole training split that every evaluation would otherwise repeat: 1.28 M
images for ImageNet, ~11 min of FID features at the ~1,950 images/s one H200 extracts (benchmarks/gpu.py).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from ulcore import layout, storage
from ulcore.config import Config
from ulcore.eval.fid import (FeatureStats, RunningStats, data_fingerprint, fid_from_stats,
                             load_reference_stats, reference_key, store_reference_stats)
from ulcore.runtime import compute_device


def frames(x: torch.Tensor) -> torch.Tensor:
    """Clips (N,C,T,H,W) -> frames (N*T,C,H,W); images pass through (video FID is over all frames)."""
    return x.permute(0, 2, 1, 3, 4).reshape(-1, x.shape[1], x.shape[3], x.shape[4]) if x.ndim == 5 else x


def take(batches: Iterable[dict[str, Any]], n: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield batches until n examples have been produced (the last one cut), with their start index."""
    seen = 0
    for batch in batches:
        if seen >= n:
            return
        b = min(batch["x"].shape[0], n - seen)
        yield seen, {k: (v[:b] if hasattr(v, "__getitem__") else v) for k, v in batch.items()}
        seen += b


def splits(cfg: Config) -> tuple[str, str]:
    """(training split, held-out split): the last configured split is held out; one split serves as both."""
    return cfg.data.splits[0], cfg.data.splits[1] if len(cfg.data.splits) > 1 else cfg.data.splits[0]


class Reference:
    """Reference statistics of real images for one split: loaded from the cache, or computed (by `fill`, or by an
    evaluation phase that reads these images anyway) and stored by `store`."""

    def __init__(self, cfg: Config, split: str, uris: list[str], n: int, weights_sha: str) -> None:
        self.root, self.split, self.uris = cfg.storage.root, split, uris
        self.key_hash, self.key = reference_key(split=split, resolution=cfg.data.resolution,
                                                weights_sha256=weights_sha, n=n,
                                                data_fingerprint=data_fingerprint(uris), frames=cfg.model.frames)
        self.load()

    def load(self) -> None:
        """Read the cache (again: another Reference with the same key may have stored it since)."""
        found = load_reference_stats(self.root, self.key_hash, self.key)
        self.stats, self.info = found if found else (None, None)

    @property
    def needed(self) -> bool:
        """Not cached: whoever reads these images computes the statistics."""
        return self.stats is None

    @property
    def n(self) -> int:
        """Images asked for; 0 = the whole split."""
        return self.key["n"]

    def fill(self, extractor, batch_size: int) -> None:
        """Compute the statistics from the split's first N images (all of them for N = 0) and store them."""
        from ulcore.data.loaders import eval_batches

        running = RunningStats()
        for _, batch in take(eval_batches(self.uris, batch_size=batch_size, kind="images"), self.n or sys.maxsize):
            running.add(extractor(frames(batch["x"])))
        self.store(running.stats())

    def store(self, stats: FeatureStats) -> None:
        """Keep and cache statistics of the split's first N images. A split holding fewer gives all it has: for the
        shards the key's fingerprint names, that is what "the first N" always is, so it is cached under N as well
        (the info's `n` says how many) and the next evaluation does not read the split again."""
        self.stats = stats
        self.info = store_reference_stats(self.root, self.key_hash, self.key, self.stats)


def fid_floor(train: Reference, held_out: Reference) -> tuple[float, bool]:
    """(FID between two real references, whether it came from the cache). Cached under both keys when both
    statistics are stored files: the 2048-d matrix square root of cached statistics costs seconds."""
    stored = bool(train.info.get("file_sha256") and held_out.info.get("file_sha256"))
    uri = layout.fid_floor(train.root, train.key_hash, held_out.key_hash)
    files = {"train_sha256": train.info.get("file_sha256"), "held_out_sha256": held_out.info.get("file_sha256")}
    if stored and storage.exists(uri):
        saved = storage.read_json(uri)
        if {k: saved.get(k) for k in files} == files:
            return float(saved["fid_floor"]), True
    value = fid_from_stats(train.stats, held_out.stats)
    if stored:
        storage.write_json(uri, {"fid_floor": value, **files})
    return value, False


def floor_reference(cfg: Config, uris: list[str], weights_sha: str, *others: Reference) -> Reference:
    """The training side of the FID floor: the split's first eval.num_samples images; one of `others` when it has
    the same key (the gFID reference when reference_samples = num_samples, the rFID one with a single split)."""
    ref = Reference(cfg, splits(cfg)[0], uris, cfg.eval.num_samples, weights_sha)
    return next((o for o in others if o.key_hash == ref.key_hash), ref)


def run_reference(cfg: Config) -> dict[str, Any]:
    """The `reference` stage: compute the gFID and rFID reference statistics that are not stored yet, and the FID
    floor."""
    from ulcore.data.loaders import shard_uris
    from ulcore.eval.inception import extractor_on, resolve_fid_weights

    storage.use_endpoint(cfg.storage.s3_endpoint)
    e, t_start = cfg.eval, time.perf_counter()
    weights = resolve_fid_weights(e.fid_weights)  # a missing or broken network fails here, before any training
    train_split, eval_split = splits(cfg)
    plan = {"gfid_reference": (train_split, e.reference_samples), "rfid_reference": (eval_split, e.num_samples)}
    extractor, computed, infos, refs = None, [], {}, {}

    def fill(ref: Reference, what: str) -> None:
        nonlocal extractor
        if extractor is None:
            extractor = extractor_on(compute_device(cfg), weights, e.batch_size)
        print(f"[reference] {what}: FID statistics of {ref.n or 'all'} {ref.split} images", flush=True)
        ref.fill(extractor, e.batch_size)

    for role, (split, n) in plan.items():  # one after the other: the same key twice is computed once
        refs[role] = ref = Reference(cfg, split, shard_uris(cfg, "images", split), n, weights.sha256)
        if ref.needed:
            fill(ref, role)
            computed.append(role)
        infos[role] = {**ref.info, "split": split}
    floor_train = floor_reference(cfg, shard_uris(cfg, "images", train_split), weights.sha256, *refs.values())
    if floor_train.needed:
        fill(floor_train, "fid_floor")
    floor, floor_cached = fid_floor(floor_train, refs["rfid_reference"])
    rows = [f"| {role} | {i['split']} | {i['n']} | `{i['key_hash']}` | {'computed' if role in computed else 'cached'} |"
            for role, i in infos.items()]
    markdown = "\n".join(["| reference | split | images | key | this run |", "| --- | --- | --- | --- | --- |", *rows,
                          "", f"FID floor: {floor:.2f} ({e.num_samples} {train_split} vs {e.num_samples} {eval_split} "
                          "real images).", f"FID network: {weights.source} (sha256 {weights.sha256[:12]})."])
    return {**infos, "computed": computed, "fid_weights_sha256": weights.sha256,
            "fid_floor": {"value": floor, "cached": floor_cached, "train_reference": floor_train.info},
            "seconds": round(time.perf_counter() - t_start, 2), "markdown": markdown}


__all__ = ["Reference", "run_reference", "fid_floor", "floor_reference", "frames", "take", "splits"]
