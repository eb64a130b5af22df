"""Stage 1 under each gradient-clipping rule at one sample budget: held-out EMA bits/pixel and PSNR per seed.

    python benchmarks/clipping.py [--samples 8192] [--seeds 0 1] [--rules ...] [--shards ROOT] [--threads N]

Each run is the training loop's step (ulcore/train/loop.py: the stage-1 objective in nats per example, AdamW with
warm-up, the clipper, EMA, per-step seeds) in this one process, without Ray or checkpoints, so a comparison fits a
shared CPU; the numbers are the stage-1 monitor's (held-out batch, EMA nets), as in metrics/stage1.json. clip% is
the share of steps whose gradient was clipped. --shards reuses a storage root that already holds data/shards.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from _fixture import PARAMS, sharded_config  # benchmarks/ is sys.path[0] when run as a script
from ulcore import layout
from ulcore.config import Config, load_config
from ulcore.train import stage1
from ulcore.train.clipping import GradClipper
from ulcore.train.ema import EMA
from ulcore.train.loop import lr_at, step_generator
from ulcore.runtime import autocast, resolve_precision

RULES = {
    "absolute 1.0": ["stage1.grad_clip_mode=absolute", "stage1.grad_clip=1.0"],
    "off": ["stage1.grad_clip=0"],
    "relative 2.0": ["stage1.grad_clip_mode=relative", "stage1.grad_clip=2.0"],
}


def train(cfg: Config) -> dict[str, float]:
    """worker_loop's step for one rank: same objective, optimiser, schedule, clipping, EMA and seeds."""
    t = cfg.stage1
    precision = resolve_precision(t.precision, torch.device("cpu"))
    torch.manual_seed(t.seed)
    objective = stage1.Stage1Objective(cfg)
    ema = EMA(objective, t.ema_halflife_samples)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step * t.batch_size, t))
    clipper = GradClipper(t.grad_clip_mode, t.grad_clip)
    batches = stage1.train_batches(cfg, t.batch_size, 0, 1, (t.seed * 1_000_003) % 2**31)
    start, step = time.perf_counter(), 0
    while step * t.batch_size < t.total_samples:
        with autocast(precision, torch.device("cpu")):
            loss = objective(next(batches), step_generator(t.seed, 0, step)).loss.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clipper.clip_(objective.parameters())
        optimizer.step()
        scheduler.step()
        ema.update(objective, t.batch_size)
        step += 1
    metrics = stage1.monitor(cfg, ema.module, step * t.batch_size, None, None)
    return {"bits_per_pixel": metrics["ema_bits_per_pixel"], "psnr": metrics["ema_psnr"],
            "clip_fraction": clipper.clipped_steps / step, "wall_seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--shards", default="", help="a storage root with data/shards (default: shard afresh)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: ray.cpus_per_worker)")
    args = parser.parse_args()
    root = args.shards or sharded_config([]).storage.root
    if not Path(layout.shards_summary(root)).is_file():
        parser.error(f"--shards {root}: no data/shards/summary.json there")
    base = [f"storage.root={root}", f"stage1.total_samples={args.samples}"]
    torch.set_num_threads(args.threads or int(load_config(PARAMS, base).ray.cpus_per_worker))
    rows = []
    print(f"{'rule':<14} {'seed':>4} {'bits/pixel':>10} {'PSNR dB':>8} {'clip%':>6} {'wall s':>7}", flush=True)
    for seed in args.seeds:  # every rule at one seed before the next seed: a cut-short run still compares rules
        for rule in args.rules:
            m = train(load_config(PARAMS, [*base, f"stage1.seed={seed}", *RULES[rule]]))
            rows.append((rule, m["bits_per_pixel"], m["psnr"]))
            print(f"{rule:<14} {seed:>4} {m['bits_per_pixel']:>10.4f} {m['psnr']:>8.2f} "
                  f"{100 * m['clip_fraction']:>5.0f}% {m['wall_seconds']:>7.0f}", flush=True)
    for rule in args.rules:
        bpp = [b for r, b, _ in rows if r == rule]
        psnr = [p for r, _, p in rows if r == rule]
        print(f"mean {rule:<14} bits/pixel {statistics.mean(bpp):.4f}  PSNR {statistics.mean(psnr):.2f} dB "
              f"({len(bpp)} seeds)")


if __name__ == "__main__":
    main()
