"""The shard stage: raw ImageNet / Kinetics / embedded source -> WebDataset shards + summary, as Ray tasks.

Plan on the driver, work in tasks: the driver lists the raw root (its manifest: ulcore.data.manifest) and every
split, decides which inputs each shard holds (`assign`) and gives each shard to one Ray task. A shard's
`inputs_digest` hashes its inputs (key, location, class, annotation, and the manifest's size and ETag or mtime of
the file) and the params that shape its bytes; a shard is skipped on rerun when its stats JSON records the same
digest, so an interrupted run, rerun, finishes with exactly the shards of an uninterrupted one, and changed
params or raw files rebuild only the shards they touch.

Resharding is incremental: a finished shard keeps the inputs it holds (its stats list their keys), so a new raw
file never moves another input between shards. Shards whose inputs are all unchanged stay as they are, not
rewritten; a shard with a changed or removed input is rewritten; new inputs fill the last shard up to
`shard.samples_per_shard`, then new shards; a shard whose inputs all vanished is removed. A first run (or a changed
`shard.samples_per_shard`) cuts the sorted inputs into chunks of that size. The summary lists every shard with its
inputs digest and records the raw manifest's digest, so what later stages read changes exactly when a shard does.

Bad inputs become rejects with a reason inside the task; only infrastructure failures (storage errors) fail a task,
which Ray retries when they may pass (OSError, botocore errors after botocore's own retries), and a shard still
failing fails the stage after the other shards are done. An S3 endpoint that cannot be reached
(storage.StorageUnreachable) is not retried: the stage stops at once with that one message.

    python -m ulcore.data.sharding [--params params.yaml] [--set data.source=embedded-video]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ulcore import layout, storage
from ulcore.config import Config, add_config_args, config_or_exit
from ulcore.data import embedded, imagenet, kinetics, listing
from ulcore.data.listing import Listing
from ulcore.data.manifest import fingerprints, raw_manifest, raw_root, record
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


def assign(keys: list[str], per: int, previous: dict[int, list[str]]) -> dict[int, list[str]]:
    """Shard index -> the input keys it holds, in index order.

    `keys` are the split's current inputs in listing order, `previous` the keys each finished shard holds. Such a
    shard keeps those of its keys still present (none left: it is not planned, so it goes). The other keys, in
    order, fill the indices below the highest kept one that no shard holds, then top that one up to `per`, then
    take new indices. A first run thus cuts `keys` into chunks of `per`, and a rerun after an interruption makes
    exactly the same cut.
    """
    present = set(keys)
    groups: dict[int, list[str]] = {}
    taken: set[str] = set()
    for index in sorted(previous):
        kept = [k for k in previous[index] if k in present and k not in taken]
        if kept:
            groups[index] = kept
            taken.update(kept)
    rest = [k for k in keys if k not in taken]
    top = max(groups, default=-1)
    targets = itertools.chain((i for i in range(top) if i not in groups), [top] if top >= 0 else [],
                              itertools.count(top + 1))
    start = 0
    for index in targets:
        if start >= len(rest):
            break
        group = groups.setdefault(index, [])
        room = max(per - len(group), 0)
        group += rest[start:start + room]
        start += room
    return dict(sorted(groups.items()))


def plan_jobs(cfg: Config, split: str, items: list[Item], fingerprint: Callable[[Item], str],
              previous: dict[int, dict]) -> list[ShardJob]:
    """One job per planned shard (`assign`; `previous` maps index -> stats of the finished shards of this plan)."""
    by_key = {it.key: it for it in items}
    groups = assign([it.key for it in items], cfg.shard.samples_per_shard,
                    {index: stats["keys"] for index, stats in previous.items()})
    params = json.dumps(sample_params(cfg), sort_keys=True)
    folder = layout.shards(cfg.storage.root, split)
    jobs = []
    for index, keys in groups.items():
        chunk = tuple(by_key[k] for k in keys)
        text = params + "\n" + "\n".join(
            f"{it.key}\t{it.uri}\t{it.cls}\t{json.dumps(it.info(), sort_keys=True, default=str)}\t{fingerprint(it)}"
            for it in chunk)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        jobs.append(ShardJob(split, index, storage.join(folder, shard_name(split, index)), chunk, digest))
    return jobs


def previous_plan(cfg: Config, files: list[str], split: str) -> dict[int, dict]:
    """Index -> stats of the split's finished shards that hold a plan of the current `shard.samples_per_shard`
    (the keys of their inputs); shards written with another size are replanned from scratch."""
    previous = {}
    for uri in finished_shards(files, split):
        stats = read_stats(uri)
        if stats and stats.get("samples_per_shard") == cfg.shard.samples_per_shard and "keys" in stats:
            previous[int(SHARD_PATTERN.match(os.path.basename(uri))["index"])] = stats
    return previous


def build_shard(job: ShardJob, cfg: Config, env: dict[str, str]) -> dict[str, Any]:
    """One Ray task: every input of the job -> a sample or a reject; write the shard and its stats.

    `cfg` is the driver's validated Config, pickled as is (rebuilding it from a dict cost ~4 ms per task).
    """
    os.environ.update(env)  # the driver's S3 endpoint/keys: a reused Ray worker may have started before them
    rejects: list[dict[str, str]] = []
    extra: dict[str, Any] = {"split": job.split, "index": job.index, "inputs": len(job.items),
                             "inputs_digest": job.digest, "keys": [it.key for it in job.items],
                             "samples_per_shard": cfg.shard.samples_per_shard, "rejects": rejects}

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


def _remove_unplanned(files: list[str], split: str, planned: set[int]) -> list[str]:
    """Shards the plan no longer holds (their inputs vanished, or an earlier plan had more) would pollute readers."""
    removed = []
    for uri in files:
        match = SHARD_PATTERN.match(os.path.basename(uri))
        if match and match["split"] == split and int(match["index"]) not in planned:
            storage.remove(stats_uri(uri))
            storage.remove(uri)
            removed.append(uri)
    return removed


def summarise(cfg: Config, root: str, manifest: dict, classes: list[dict], listings: dict[str, Listing],
              stats: dict[str, list[dict]]) -> dict[str, Any]:
    """Per split: every shard with its inputs digest, samples written, inputs rejected (by reason; every one listed
    under `rejected`), hidden files ignored and good inputs capped by data.max_per_class; the raw manifest's
    digest and counts."""
    summary: dict[str, Any] = {"source": cfg.data.source, "raw_root": root, "shards_root": layout.shards(cfg.storage.root),
                               "raw_manifest": record(manifest), "sample_params": sample_params(cfg),
                               "classes": classes, "splits": {}, "rejected": []}
    for split, listed in listings.items():
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
            "index": [{"shard": s["shard"], "inputs_digest": s["inputs_digest"], "samples": s["samples"]}
                      for s in stats[split]],
        }
    return summary


def run_shard(cfg: Config) -> dict[str, Any]:
    """The shard stage; idempotent and incremental. Returns the summary also written to data/shards/summary.json."""
    start = time.perf_counter()
    storage.use_endpoint(cfg.storage.s3_endpoint, cfg.storage.unreachable_after_s)
    root = raw_root(cfg)
    if cfg.data.source not in IMAGE_SOURCES + VIDEO_SOURCES:
        raise ValueError(f"data.source = {cfg.data.source!r}: expected one of {IMAGE_SOURCES + VIDEO_SOURCES}")
    manifest = raw_manifest(cfg)  # before the listing: a file added in between is rebuilt by the next run
    if cfg.data.source.startswith("embedded"):
        embedded.ensure_source(cfg, root)
    prints = fingerprints(manifest)

    def fingerprint(item: Item) -> str:
        """The manifest's entry; an input it does not list (generated from the embedded asset, or newer than the
        manifest) is identified by the manifest's digest."""
        return prints.get(listing.relative(item.uri, root), manifest["digest"])

    classes, listings = list_source(cfg, root)
    stats: dict[str, list[dict]] = {}
    pending: list[ShardJob] = []
    removed: list[str] = []
    for split, listed in listings.items():
        files = storage.list_uris(layout.shards(cfg.storage.root, split))  # one listing: done shards and stale ones
        previous = previous_plan(cfg, files, split)
        jobs = plan_jobs(cfg, split, listed.items, fingerprint, previous)
        stats[split] = []
        for job in jobs:
            done = previous.get(job.index)
            if done is not None and done.get("inputs_digest") == job.digest:
                stats[split].append(done)
            else:
                pending.append(job)
        removed += _remove_unplanned(files, split, {job.index for job in jobs})
    for uri in removed:
        log.warning("removed shard %s: the plan no longer holds it", uri)
    skipped = sum(len(v) for v in stats.values())
    failures: list[str] = []
    if pending:
        built, failures = _run_jobs(cfg, pending)
        for s in built:
            stats[s["split"]].append(s)
    for split in stats:
        stats[split].sort(key=lambda s: s["index"])
    summary = summarise(cfg, root, manifest, classes, listings, stats)
    summary["run"] = {"shards_built": len(pending) - len(failures), "shards_skipped": skipped,
                      "shards_removed": len(removed), "shards_failed": len(failures),
                      "seconds": round(time.perf_counter() - start, 2)}
    if failures:
        raise RuntimeError(f"{len(failures)} shard(s) failed after {TASK_RETRIES} retries; rerun to resume:\n  "
                           + "\n  ".join(failures))
    _write_manifest(cfg, manifest)
    storage.write_json(layout.shards_summary(cfg.storage.root), summary)
    return summary


def _write_manifest(cfg: Config, manifest: dict[str, Any]) -> None:
    """data/shards/raw_manifest.json, every entry; left alone when the summary already records this digest."""
    uri, summary_uri = layout.shards_raw_manifest(cfg.storage.root), layout.shards_summary(cfg.storage.root)
    try:
        recorded = storage.read_json(summary_uri).get("raw_manifest", {}).get("digest")
    except (FileNotFoundError, ValueError):
        recorded = None
    if recorded != manifest["digest"] or not storage.exists(uri):
        storage.write_json(uri, manifest)


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
