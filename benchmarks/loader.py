"""Loader throughput vs what a `tiny` Stage-1 step consumes (target >= 5x), on the embedded shards.

    python benchmarks/loader.py [--batches 40] [--workers 1]

Measures `train_batches` (decode to uint8 in the loader, flip, shuffle) in samples/s, then one Stage-1
training step of the tiny preset on the same batch size (fp32, this machine's threads) in samples/s.
"""

from __future__ import annotations

import argparse
import time

import torch

from _fixture import sharded_config  # benchmarks/ is sys.path[0] when run as a script
from ulcore.train import stage1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    cfg = sharded_config(["shard.samples_per_shard=500"])
    import ray

    ray.shutdown()  # sharding's Ray cluster is not needed for reading
    batch = cfg.stage1.batch_size
    from ulcore.data import loaders

    stream = loaders.train_batches(loaders.shard_uris(cfg, "images", "train"), batch_size=batch, rank=0,
                                   world_size=1, seed=0, kind="images", flip=True, num_workers=args.workers)
    first = next(stream)
    start = time.perf_counter()
    for _ in range(args.batches):
        next(stream)
    loader_rate = args.batches * batch / (time.perf_counter() - start)

    torch.manual_seed(0)
    objective = stage1.Stage1Objective(cfg)
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-3)
    steps, start = 5, None
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        loss = objective(first, torch.Generator().manual_seed(i)).loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step_rate = steps * batch / (time.perf_counter() - start)
    print(f"batch={batch} loader workers={args.workers} torch threads={torch.get_num_threads()}")
    print(f"loader (train_batches, uint8 decode + flip): {loader_rate:8.1f} samples/s")
    print(f"tiny stage-1 training step consumes:         {step_rate:8.1f} samples/s")
    print(f"headroom: {loader_rate / step_rate:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
