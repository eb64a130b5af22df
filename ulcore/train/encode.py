"""The pre-encode pass: the frozen EMA encoder over every image shard -> latent shards (UL §3.3).

One Ray task per shard (a GPU each when ray.use_gpu), idempotent per shard: a latent shard whose stats name the
same encoder and the same input shard is kept. Latent shards hold `z_clean` as float16 `.npy` plus `.cls`;
data/latents/stats.json holds per-channel mean and std over the training split.

On a GPU the next batch is read and decoded on a background thread while the encoder runs on the current one, so
the GPU does not wait for the CPU between batches. On CPU both would share the task's one core: measured, the
thread only added ~4 % CPU time, so CPU tasks decode inline.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch

from ulcore import layout, storage
from ulcore.config import Config, check_model_matches_data, config_from_dict
from ulcore.data import loaders
from ulcore.data.shards import content_digest, list_shards, read_stats, stats_uri, write_shard
from ulcore.models import load_encoder, stage1_root
from ulcore.runtime import compute_device, ensure_ray


def encoder_digest(cfg: Config) -> str:
    """Identity of the exported encoder (stage 1 writes done.json with its run digest)."""
    uri = layout.done_marker(cfg.storage.root, "stage1")
    digest = layout.recorded_digest(uri)
    if digest is None:
        raise FileNotFoundError(f"{uri} not found: run the stage1 stage first (python -m flows.stage1)")
    return digest


@functools.lru_cache(maxsize=1)
def _cached_encoder(root: str, encoder_id: str, device: str) -> torch.nn.Module:
    """Ray reuses worker processes across tasks: load the encoder once per process, not once per shard."""
    return load_encoder(root).to(device)


T = TypeVar("T")


def prefetched(items: Iterator[T]) -> Iterator[T]:
    """The same items, the next one produced on a background thread while the caller works on the current one."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        upcoming = pool.submit(next, items, None)
        while (item := upcoming.result()) is not None:
            upcoming = pool.submit(next, items, None)
            yield item


def _shard_digest(shard_uri: str) -> str:
    return content_digest(read_stats(shard_uri) or {})


def encode_shard(shard_uri: str, out_uri: str, cfg_dict: dict[str, Any], env: dict[str, str],
                 encoder_id: str) -> dict[str, Any]:
    """One Ray task: encode every sample of one image shard; returns per-channel sums for the statistics."""
    os.environ.update(env)
    cfg = config_from_dict(cfg_dict)
    source = _shard_digest(shard_uri)
    done = read_stats(out_uri)
    if done and done.get("encoder") == encoder_id and done.get("source_digest") == source:
        return {**done, "skipped": True}
    device = compute_device(cfg)
    encoder = _cached_encoder(stage1_root(cfg), encoder_id, str(device))
    sums: dict[str, Any] = {}

    def samples():
        channel_sum = channel_sq = None
        count = 0
        batches = loaders.eval_batches([shard_uri], batch_size=cfg.encode.batch_size, kind="images")
        for batch in prefetched(batches) if device.type == "cuda" else batches:
            with torch.inference_mode():  # uint8 to the device: a quarter of the float32 bytes to copy
                z = encoder(loaders.to_float(batch["x"].to(device))).float().cpu()
            dims = [0] + list(range(2, z.ndim))
            channel_sum = z.sum(dims).double() + (0 if channel_sum is None else channel_sum)
            channel_sq = (z.double() ** 2).sum(dims) + (0 if channel_sq is None else channel_sq)
            count += z.numel() // z.shape[1]
            for key, zi, cls in zip(batch["key"], z.numpy().astype(np.float16), batch["cls"].tolist(), strict=True):
                yield {"__key__": key, "npy": zi, "cls": int(cls)}
        sums.update(count=count, sum=(channel_sum.tolist() if count else []), sumsq=(channel_sq.tolist() if count else []))

    extra = {"encoder": encoder_id, "source": shard_uri, "source_digest": source, "channel_stats": sums}
    return write_shard(out_uri, samples(), extra)


def latent_statistics(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine per-shard channel sums into mean and std per latent channel."""
    parts = [r["channel_stats"] for r in results if r.get("channel_stats", {}).get("count")]
    if not parts:
        return {"count": 0, "mean": [], "std": []}
    count = sum(p["count"] for p in parts)
    total = np.sum([p["sum"] for p in parts], axis=0)
    total_sq = np.sum([p["sumsq"] for p in parts], axis=0)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return {"count": int(count), "mean": mean.tolist(), "std": std.tolist(), "overall_std": float(np.sqrt(
        max(total_sq.sum() / (count * len(mean)) - (total.sum() / (count * len(mean))) ** 2, 0.0)))}


def run_encode(cfg: Config) -> dict[str, Any]:
    """The `encode` stage: latent shards for every split, then data/latents/stats.json."""
    import ray

    check_model_matches_data(cfg)
    encoder_id = encoder_digest(cfg)
    root = cfg.storage.root
    jobs = []
    for split in cfg.data.splits:
        for shard in list_shards(layout.shards(root, split), split):
            jobs.append((shard, storage.join(layout.latents(root, split), os.path.basename(shard)), split))
    if not jobs:
        raise FileNotFoundError(f"no finished image shards under {layout.shards(root)}: run the shard stage first")
    targets = {dst for _, dst, _ in jobs}
    for split in cfg.data.splits:  # the image shard went (its raw inputs vanished): so does its latent shard
        for stale in [u for u in list_shards(layout.latents(root, split), split) if u not in targets]:
            storage.remove(stats_uri(stale))
            storage.remove(stale)
    ensure_ray(cfg.ray)
    task = ray.remote(encode_shard).options(num_cpus=1, num_gpus=1 if cfg.ray.use_gpu else 0, max_retries=2,
                                            retry_exceptions=storage.transient_errors())
    cfg_dict, env = cfg.to_dict(), storage.s3_env(credentials=not cfg.ray.address)
    results = ray.get([task.remote(src, dst, cfg_dict, env, encoder_id) for src, dst, _ in jobs])
    train = [r for r, (_, _, split) in zip(results, jobs, strict=True) if split == cfg.data.splits[0]]
    stats = {"encoder": encoder_id, "splits": {}, "train_channels": latent_statistics(train)}
    for (_, dst, split), r in zip(jobs, results, strict=True):
        entry = stats["splits"].setdefault(split, {"shards": 0, "samples": 0})
        entry["shards"] += 1
        entry["samples"] += r["samples"]
    storage.write_json(layout.latents_stats(root), stats)
    skipped = sum(bool(r.get("skipped")) for r in results)
    rows = "\n".join(f"| {s} | {v['shards']} | {v['samples']} |" for s, v in stats["splits"].items())
    return {"latents": layout.latents(root), "stats": stats, "shards_written": len(results) - skipped,
            "shards_skipped": skipped,
            "markdown": f"## encode\n\n| split | shards | samples |\n|---|---|---|\n{rows}\n\n"
                        f"latent std (train): {stats['train_channels'].get('overall_std', float('nan')):.4g}"}
