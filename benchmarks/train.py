"""Stage-1 throughput through the Ray Train loop vs the same model, batch and loader in a bare PyTorch loop.

    python benchmarks/train.py [--samples 4096] [--batch 64]

Both run on this machine with the same number of torch threads (ray.cpus_per_worker). The Ray figure is the
loop's own steady-state samples/s (it excludes Ray start-up and checkpoint writes, which are reported apart as
wall time); target ratio >= 0.95. Also prints the worker's peak RSS.
"""

from __future__ import annotations

import argparse
import time

import torch

from _fixture import sharded_config  # benchmarks/ is sys.path[0] when run as a script
from ulcore.train import stage1
from ulcore.train.clipping import GradClipper
from ulcore.train.loop import fit, run_digest


def bare_loop(cfg, samples: int) -> float:
    """The reference: one process, no Ray, no DDP, no EMA/checkpoints; same objective, optimiser and loader."""
    torch.manual_seed(0)
    objective = stage1.Stage1Objective(cfg)
    opt = torch.optim.AdamW(objective.parameters(), lr=cfg.stage1.lr, fused=True)  # the optimiser the loop uses
    clipper = GradClipper(cfg.stage1.grad_clip_mode, cfg.stage1.grad_clip)
    batches = stage1.train_batches(cfg, cfg.stage1.batch_size, 0, 1, 0)
    next(batches)
    start, seen, step = time.perf_counter(), 0, 0
    while seen < samples:
        batch = next(batches)
        loss = objective(batch, torch.Generator().manual_seed(step)).loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clipper.clip_(objective.parameters())
        opt.step()
        seen += batch["x"].shape[0]
        step += 1
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    n = args.samples
    cfg = sharded_config([f"stage1.batch_size={args.batch}", f"stage1.total_samples={n}",
                          f"stage1.log_every_samples={n // 2}", f"stage1.ckpt_every_samples={n}",
                          "stage1.warmup_samples=0", "stage1.precision=fp32", "ray.num_workers=1"])
    threads = int(cfg.ray.cpus_per_worker)
    torch.set_num_threads(threads)
    bare = bare_loop(cfg, n // 2)
    start = time.perf_counter()
    result = fit(cfg, stage1.SPEC, digest=run_digest(cfg, stage1.SPEC, f"bench-{time.time()}"), run_id=None)
    wall = time.perf_counter() - start
    ray_rate = result.metrics["samples_per_s"]  # the loop's rate over its last log interval (steady state)
    print(f"threads={threads} batch={args.batch} samples={n} (bare loop: {n // 2} after one warm-up batch)")
    print(f"bare PyTorch loop:             {bare:8.1f} samples/s")
    print(f"Ray Train loop (steady state): {ray_rate:8.1f} samples/s   ratio {ray_rate / bare:.3f} (target >= 0.95)")
    print(f"Ray Train fit() wall time:     {n / wall:8.1f} samples/s incl. Ray start-up and checkpoints ({wall:.1f} s)")
    print(f"worker peak RSS:               {result.metrics['peak_rss_mb']:8.0f} MiB")


if __name__ == "__main__":
    main()
