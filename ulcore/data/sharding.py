"""The shard stage: raw ImageNet / Kinetics / embedded source -> WebDataset shards + summary, as Ray tasks.

Plan on the driver, work in tasks: the driver lists every split (sorted, so the same files always land in the
same shard), cuts the list into `shard.samples_per_shard` chunks and gives each chunk to one Ray task that
writes one shard. A shard is skipped on rerun when its stats JSON exists and records the same `inputs_digest`
(a hash of its inputs and the params that shape its bytes), so an interrupted run, rerun, finishes with exactly
the samples of an uninterrupted one, and changed params rebuild only what they change. Bad inputs become
rejects with a reason inside the task; only infrastructure failures (storage errors) fail a task, which Ray
retries when they may pass (OSError, botocore errors after botocore's own retries), and a shard still failing fails
the stage after the other shards are done. An S3 endpoint that cannot be reached (storage.StorageUnreachable) is
not retried: the stage stops at once with that one message.

    python -m ulcore.data.sharding [--params params.yaml] [--set data.source=embedded-video]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ulcore import layout, storage
from ulcore.config import Config, add_config_args, config_or_exit
from ulcore.data import embedded, imagenet, kinetics
from ulcore.data.listing import Listing
from ulcore.data.shards import (SHARD_PATTERN, Item, SampleError, finished_shards, read_stats, shard_name,
                                stats_uri, write_shard)

log = logging.getLogger(__name__)

IMAGE_SOURCES = ("embedded", "imagenet")
VIDEO_SOURCES = ("embedded-video", "kinetics")
TASK_RETRIES = 2


@dataclass(frozen=True)
class ShardJob:
    split: str
    index: int
    uri: str
    items: tuple[Item, ...]
    digest: str


def raw_root(cfg: Config) -> str:
    """data.root, or <storage.root>/data/raw/<source> (where the embedded sources are generated)."""
    return cfg.data.root or layout.raw(cfg.storage.root, cfg.data.source)


def list_source(cfg: Config, root: str) -> tuple[list[dict], dict[str, Listing]]:
    """Class table and, per split, the sorted items plus the inputs rejected or ignored while listing."""
    splits = {}
    if cfg.data.source in IMAGE_SOURCES:
        table = imagenet.read_classes(root, cfg.data.splits[0])
        classes = [{"index": i, "id": wnid, "name": name} for i, (wnid, name) in enumerate(table)]
        for split in cfg.data.splits:
            splits[split] = imagenet.list_split(root, split, table, cfg.data.max_per_class)
    else:
        labels = kinetics.read_classes(root, cfg)
        classes = [{"index": i, "id": label, "name": label} for i, label in enumerate(labels)]
        for split in cfg.data.splits:
            splits[split] = kinetics.list_split(root, cfg, split, labels)
    return classes, splits


def sample_params(cfg: Config) -> dict[str, Any]:
    """The params that shape a shard's bytes: a change to any of them rebuilds the shard."""
    params: dict[str, Any] = {"source": cfg.data.source, "resolution": cfg.data.resolution, "layout": 1}
    if cfg.data.source in IMAGE_SOURCES:
        params["image_format"] = cfg.shard.image_format
    else:
        params.update(frames=cfg.video.frames, fps=cfg.video.fps, clip_format=cfg.video.clip_format,
                      clip_position=cfg.video.clip_position)
    return params


def plan_jobs(cfg: Config, split: str, items: list[Item]) -> list[ShardJob]:
    per = cfg.shard.samples_per_shard
    params = json.dumps(sample_params(cfg), sort_keys=True)
    folder = layout.shards(cfg.storage.root, split)
    jobs = []
    for index, start in enumerate(range(0, len(items), per)):
        chunk = tuple(items[start:start + per])
        text = params + "\n" + "\n".join(f"{it.key}\t{it.uri}\t{it.cls}" for it in chunk)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        jobs.append(ShardJob(split, index, storage.join(folder, shard_name(split, index)), chunk, digest))
    return jobs


def build_shard(job: ShardJob, cfg: Config, env: dict[str, str]) -> dict[str, Any]:
    """One Ray task: every input of the job -> a sample or a reject; write the shard and its stats.

    `cfg` is the driver's validated Config, pickled as is (rebuilding it from a dict cost ~4 ms per task).
    """
    os.environ.update(env)  # the driver's S3 endpoint/keys: a reused Ray worker may have started before them
    rejects: list[dict[str, str]] = []
    extra: dict[str, Any] = {"split": job.split, "index": job.index, "inputs": len(job.items),
                             "inputs_digest": job.digest, "rejects": rejects}

    def samples():
        for item in job.items:
            try:
                if cfg.data.source in IMAGE_SOURCES:
                    yield imagenet.make_sample(item, resolution=cfg.data.resolution,
                                               image_format=cfg.shard.image_format)
                else:
                    yield kinetics.make_sample(item, cfg=cfg)
            except SampleError as exc:
                rejects.append({"path": item.uri, "key": item.key, "reason": exc.reason, "detail": exc.detail})
        extra["rejected"] = len(rejects)
        extra["rejected_by_reason"] = dict(sorted(Counter(r["reason"] for r in rejects).items()))

    return write_shard(job.uri, samples(), extra)


def _run_jobs(cfg: Config, jobs: list[ShardJob]) -> tuple[list[dict], list[str]]:
    """Run jobs as Ray tasks, at most shard.max_parallel in flight; returns (stats, failure messages)."""
    import ray

    from ulcore.runtime import ensure_ray

    ensure_ray(cfg.ray)
    task = ray.remote(build_shard).options(num_cpus=1, max_retries=TASK_RETRIES,
                                           retry_exceptions=storage.transient_errors())
    env = storage.s3_env(credentials=not cfg.ray.address)
    queue = list(jobs)
    running: dict[Any, ShardJob] = {}
    done: list[dict] = []
    failures: list[str] = []
    while queue or running:
        while queue and len(running) < cfg.shard.max_parallel:
            job = queue.pop(0)
            running[task.remote(job, cfg, env)] = job
        ready, _ = ray.wait(list(running), num_returns=1)
        job = running.pop(ready[0])
        try:
            stats = ray.get(ready[0])
        except storage.StorageUnreachable as exc:  # every other shard would wait out the same limit: stop now
            for ref in running:
                ray.cancel(ref, force=True)
            raise storage.StorageUnreachable(str(getattr(exc, "cause", None) or exc)) from None
        except Exception as exc:  # after Ray's retries: report it, finish the rest, fail at the end
            failures.append(f"{job.uri}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}")
            log.error("shard %s failed: %s", job.uri, exc)
            continue
        done.append(stats)
        log.info("%s: %d samples, %d rejected", job.uri, stats["samples"], stats.get("rejected", 0))
    return done, failures


def _remove_stale(files: list[str], split: str, keep: int) -> list[str]:
    """Shards numbered beyond the current plan (an earlier run had more inputs) would pollute readers."""
    removed = []
    for uri in files:
        match = SHARD_PATTERN.match(os.path.basename(uri))
        if match and match["split"] == split and int(match["index"]) >= keep:
            storage.remove(stats_uri(uri))
            storage.remove(uri)
            removed.append(uri)
    return removed


def summarise(cfg: Config, root: str, classes: list[dict], listing: dict[str, Listing],
              stats: dict[str, list[dict]]) -> dict[str, Any]:
    """Per split: samples written, inputs rejected (by reason; every one listed under `rejected`), hidden files
    ignored and good inputs capped by data.max_per_class."""
    summary: dict[str, Any] = {"source": cfg.data.source, "raw_root": root, "shards_root": layout.shards(cfg.storage.root),
                               "sample_params": sample_params(cfg), "classes": classes, "splits": {},
                               "rejected": []}
    for split, listed in listing.items():
        per_class: Counter[str] = Counter()
        reasons: Counter[str] = Counter(r["reason"] for r in listed.rejects)
        samples = 0
        for s in stats[split]:
            samples += s["samples"]
            per_class.update({k: int(v) for k, v in s["classes"].items()})
            reasons.update(s.get("rejected_by_reason", {}))
        rejected = listed.rejects + [r for s in stats[split] for r in s.get("rejects", [])]
        summary["rejected"] += [{"split": split, **r} for r in rejected]
        summary["splits"][split] = {
            "shards": len(stats[split]), "listed": len(listed.items), "samples": samples, "rejected": len(rejected),
            "rejected_by_reason": dict(sorted(reasons.items())), "ignored": listed.ignored, "capped": listed.capped,
            "per_class": {str(c["index"]): per_class.get(str(c["index"]), 0) for c in classes},
        }
    return summary


def run_shard(cfg: Config) -> dict[str, Any]:
    """The shard stage; idempotent. Returns the summary also written to data/shards/summary.json."""
    start = time.perf_counter()
    storage.use_endpoint(cfg.storage.s3_endpoint, cfg.storage.unreachable_after_s)
    root = raw_root(cfg)
    if cfg.data.source not in IMAGE_SOURCES + VIDEO_SOURCES:
        raise ValueError(f"data.source = {cfg.data.source!r}: expected one of {IMAGE_SOURCES + VIDEO_SOURCES}")
    if cfg.data.source.startswith("embedded"):
        embedded.ensure_source(cfg, root)
    classes, listing = list_source(cfg, root)
    stats: dict[str, list[dict]] = {}
    pending: list[ShardJob] = []
    for split, listed in listing.items():
        jobs = plan_jobs(cfg, split, listed.items)
        files = storage.list_uris(layout.shards(cfg.storage.root, split))  # one listing: done shards and stale ones
        finished = set(finished_shards(files, split))
        stats[split] = []
        for job in jobs:
            previous = read_stats(job.uri) if job.uri in finished else None
            if previous is not None and previous.get("inputs_digest") == job.digest:
                stats[split].append(previous)
            else:
                pending.append(job)
        for uri in _remove_stale(files, split, len(jobs)):
            log.warning("removed stale shard %s", uri)
    skipped = sum(len(v) for v in stats.values())
    failures: list[str] = []
    if pending:
        built, failures = _run_jobs(cfg, pending)
        for s in built:
            stats[s["split"]].append(s)
    for split in stats:
        stats[split].sort(key=lambda s: s["index"])
    summary = summarise(cfg, root, classes, listing, stats)
    summary["run"] = {"shards_built": len(pending) - len(failures), "shards_skipped": skipped,
                      "shards_failed": len(failures), "seconds": round(time.perf_counter() - start, 2)}
    if failures:
        raise RuntimeError(f"{len(failures)} shard(s) failed after {TASK_RETRIES} retries; rerun to resume:\n  "
                           + "\n  ".join(failures))
    storage.write_json(layout.shards_summary(cfg.storage.root), summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Shard the configured source into WebDataset tars.")
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = config_or_exit(args.params if os.path.exists(args.params) else None, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run_shard(cfg)
    for split, s in summary["splits"].items():
        print(f"{split}: {s['samples']} samples in {s['shards']} shards, {s['rejected']} rejected "
              f"{s['rejected_by_reason']}, {s['ignored']} hidden files ignored")


if __name__ == "__main__":
    main()
