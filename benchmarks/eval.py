"""Evaluation benchmarks: FID feature-extraction throughput of our extractor vs the bare network call (and the
network as stored in its file, before BatchNorm folding), and the wall time of the evaluate stage on the current
params (skipped with a message when no stage-1 model exists).

    python benchmarks/eval.py [--params params.yaml] [--images 64] [--batch 16] [--bf16] [--skip-stage]
                              [--fresh [--no-reference-stage]]

Targets: ratio >= 0.9 (the input pipeline - uint8 -> TF-legacy bilinear 299 -> (x - 128) / 128 - costs < 10 %);
tiny preset evaluation <= 2 min on 2 cores. The reference statistics (data/fid_refs/) belong to the data: the
`reference` stage computes them once per dataset version, before training, and every evaluation reuses them
(`reference_stats` says whether this one did). --fresh deletes the current ones first and times the two stages as
a fresh pipeline runs them, the reference stage, then evaluate; with --no-reference-stage evaluate computes them
itself (`python -m flows.evaluate` run alone on a fresh storage root).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ulcore.config import add_config_args, config_or_exit  # noqa: E402
from ulcore.eval.inception import FidFeatureExtractor, load_fid_network, network_input  # noqa: E402


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_extraction(n: int, batch: int, repeats: int = 3, weights: str = "", device: str = "cpu") -> dict:
    ext = FidFeatureExtractor(weights, batch_size=batch, device=device)
    ext.network.float()  # no-op for the real file; a half-precision copy (for transport) runs in fp32
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    prepared = [network_input(images[s:s + batch]) for s in range(0, n, batch)]
    stored = load_fid_network(ext.weights.path).float().to(device)
    ext.raw(prepared[0][:2])

    def bare(network):
        with torch.inference_mode():
            for x in prepared:
                network(x.to(device))

    bare(stored)  # warm-up: TorchScript profiling runs
    t_bare = t_ours = t_stored = float("inf")
    for _ in range(repeats):  # alternate, best of each: load drift hits all sides alike
        t_bare = min(t_bare, _best_of(lambda: bare(ext.network), 1))
        t_ours = min(t_ours, _best_of(lambda: ext(images), 1))
        t_stored = min(t_stored, _best_of(lambda: bare(stored), 1))
    return {"bench": "fid_features", "images": n, "batch": batch, "threads": torch.get_num_threads(),
            "bare_images_per_s": round(n / t_bare, 3), "extractor_images_per_s": round(n / t_ours, 3),
            "ratio": round(t_bare / t_ours, 3), "target_ratio": 0.9,
            "stored_network_images_per_s": round(n / t_stored, 3), "speedup_vs_stored": round(t_stored / t_ours, 3),
            "runs_as": ext.weights.protocol()["fid_network_runs_as"], "weights": ext.weights.source, "device": device}


def bench_bf16(n: int = 8, weights: str = "") -> dict:
    ext = FidFeatureExtractor(weights, batch_size=n)
    ext.network.float()
    x = network_input(torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(1),
                                    dtype=torch.uint8))
    ext.raw(x[:2])
    t0 = time.perf_counter()
    f32 = ext.raw(x)
    t32 = time.perf_counter() - t0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ext.raw(x[:2])
        t0 = time.perf_counter()
        bf = ext.raw(x).float()
        tbf = time.perf_counter() - t0
    return {"bench": "bf16_autocast", "fp32_s_per_image": round(t32 / n, 4), "bf16_s_per_image": round(tbf / n, 4),
            "max_abs_feature_diff": float((bf - f32).abs().max()), "mean_abs_feature": float(f32.abs().mean())}


def _remove_current_references(cfg) -> None:
    from ulcore import layout, storage
    from ulcore.data.loaders import shard_uris
    from ulcore.eval.inception import resolve_fid_weights
    from ulcore.eval.reference import Reference, splits

    sha = resolve_fid_weights(cfg.eval.fid_weights).sha256
    train, held_out = splits(cfg)
    for split, n in ((train, cfg.eval.reference_samples), (held_out, cfg.eval.num_samples)):
        uri = layout.fid_ref(cfg.storage.root, Reference(cfg, split, shard_uris(cfg, "images", split), n, sha).key_hash)
        if storage.exists(uri):
            storage.remove(uri)


def bench_stage(cfg, fresh: bool = False, reference_stage: bool = True) -> dict:
    from ulcore import layout, storage
    from ulcore.eval.evaluate import run_evaluate
    from ulcore.eval.reference import run_reference
    from ulcore.models import stage1_root

    if not storage.exists(storage.join(stage1_root(cfg), "config.yaml")):
        return {"bench": "evaluate_stage", "skipped": f"{stage1_root(cfg)} has no exported model: run the shard, "
                                                      "stage1 (and encode, stage2) stages first"}
    eval_uri = layout.metrics(cfg.storage.root, "eval")
    if storage.exists(eval_uri):  # force a real evaluation (the stage skips when nothing changed)
        storage.remove(eval_uri)
    reference_s = None
    if fresh:
        _remove_current_references(cfg)
        if reference_stage:
            t0 = time.perf_counter()
            run_reference(cfg)
            reference_s = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    result = run_evaluate(cfg)
    wall = time.perf_counter() - t0
    cached = [bool((result["protocol"].get(ref) or {}).get("cached")) for ref in ("gfid_reference", "rfid_reference")]
    return {"bench": "evaluate_stage", "preset": cfg.preset, "num_samples": cfg.eval.num_samples,
            "reference_stats": "cached" if all(cached) else "computed in this run" if not any(cached) else "partly",
            "wall_s": round(wall, 1), "target_s": 120, "reference_stage_s": reference_s,
            "timings": result.get("timings"),
            "metrics": {k: result.get(k) for k in ("gfid", "rfid", "psnr", "ssim", "bits_per_pixel_prior",
                                                    "bits_per_pixel_base")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--bf16", action="store_true", help="also measure bf16 autocast speed and feature error")
    parser.add_argument("--weights", default="", help="FID network file (default: the resolver's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-stage", action="store_true", help="only the extraction benchmark")
    parser.add_argument("--fresh", action="store_true", help="delete the current reference statistics, then run "
                                                               "the reference stage and evaluate")
    parser.add_argument("--no-reference-stage", action="store_true", help="with --fresh: evaluate computes the "
                                                                            "reference statistics itself")
    args = parser.parse_args()
    params = args.params if os.path.exists(args.params) else None
    cfg = config_or_exit(params, args.overrides)
    print(json.dumps(bench_extraction(args.images, args.batch, weights=args.weights, device=args.device)), flush=True)
    if args.bf16:
        print(json.dumps(bench_bf16(weights=args.weights)), flush=True)
    if not args.skip_stage:
        print(json.dumps(bench_stage(cfg, fresh=args.fresh, reference_stage=not args.no_reference_stage)), flush=True)


if __name__ == "__main__":
    main()
