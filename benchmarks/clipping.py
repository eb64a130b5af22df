"""Stage 1 under each gradient-clipping rule at one sample budget: held-out EMA bits/pixel and PSNR per seed.

    python benchmarks/clipping.py [--samples 8192] [--seeds 0 1]

Shards the embedded dataset once, then runs the real stage-1 entry point (Ray Train loop, EMA monitor) for every
rule and seed in its own storage root. Prints one row per run and the mean per rule; clip% is the share of steps
whose gradient was clipped.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from _fixture import PARAMS, sharded_config  # benchmarks/ is sys.path[0] when run as a script
from ulcore.config import load_config
from ulcore.train.stage1 import run_stage1

RULES = {
    "absolute 1.0": ["stage1.grad_clip_mode=absolute", "stage1.grad_clip=1.0"],
    "off": ["stage1.grad_clip=0"],
    "relative 2.0": ["stage1.grad_clip_mode=relative", "stage1.grad_clip=2.0"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    args = parser.parse_args()
    shards = Path(sharded_config([]).storage.root, "data", "shards")
    budget = [f"stage1.total_samples={args.samples}", f"stage1.ckpt_every_samples={args.samples}"]
    rows = []
    print(f"{'rule':<14} {'seed':>4} {'bits/pixel':>10} {'PSNR dB':>8} {'clip%':>6} {'wall s':>7}", flush=True)
    for seed in args.seeds:  # every rule at one seed before the next seed: a cut-short run still compares rules
        for rule in args.rules:
            root = Path(tempfile.mkdtemp(prefix="ul-clip-"))
            (root / "data").mkdir()
            os.symlink(shards, root / "data" / "shards")
            cfg = load_config(PARAMS, [f"storage.root={root}", f"stage1.seed={seed}", *budget, *RULES[rule]])
            m = run_stage1(cfg)["metrics"]
            rows.append((rule, m["bits_per_pixel"], m["psnr"]))
            print(f"{rule:<14} {seed:>4} {m['bits_per_pixel']:>10.4f} {m['psnr']:>8.2f} "
                  f"{100 * m['clip_fraction']:>5.0f}% {m['wall_seconds']:>7.0f}", flush=True)
    for rule in args.rules:
        bpp = [b for r, b, _ in rows if r == rule]
        psnr = [p for r, _, p in rows if r == rule]
        print(f"mean {rule:<14} bits/pixel {statistics.mean(bpp):.4f}  PSNR {statistics.mean(psnr):.2f} dB")


if __name__ == "__main__":
    main()
