"""The encode pass (Ray tasks, one per shard, writing latent shards) vs a bare inference loop over the same shards.

    python benchmarks/encode.py

Uses freshly initialised stage-1 nets exported the normal way (throughput does not depend on training). Target
ratio >= 0.9 of the bare loop's samples/s; both use every core (the Ray run one task per CPU, the bare loop
all threads in one process).
"""

from __future__ import annotations

import time

import torch

from _fixture import sharded_config  # benchmarks/ is sys.path[0] when run as a script
from ulcore import storage
from ulcore.data import loaders
from ulcore.data.shards import list_shards
from ulcore.train.encode import run_encode
from ulcore.train.export import export_modules, stage1_root
from ulcore.train.stage1 import Stage1Objective


def main() -> None:
    cfg = sharded_config(["shard.samples_per_shard=500"])
    torch.manual_seed(0)
    objective = Stage1Objective(cfg).eval()
    export_modules({"encoder": objective.encoder, "decoder": objective.decoder, "prior": objective.prior}, cfg,
                   stage1_root(cfg))
    storage.write_json(storage.join(stage1_root(cfg), "done.json"), {"digest": "bench"})
    shards = [u for split in cfg.data.splits
              for u in list_shards(storage.join(cfg.storage.root, "data", "shards", split), split)]

    start, seen = time.perf_counter(), 0
    with torch.inference_mode():
        for batch in loaders.eval_batches(shards, batch_size=cfg.encode.batch_size, kind="images"):
            objective.encoder(loaders.to_float(batch["x"]))
            seen += batch["x"].shape[0]
    bare = seen / (time.perf_counter() - start)

    start = time.perf_counter()
    result = run_encode(cfg)
    wall = time.perf_counter() - start
    samples = sum(v["samples"] for v in result["stats"]["splits"].values())
    import ray

    ray.shutdown()
    print(f"shards={len(shards)} samples={samples} threads(bare)={torch.get_num_threads()}")
    print(f"bare inference loop (no writes): {bare:8.1f} samples/s")
    print(f"encode stage (Ray, writes tars): {samples / wall:8.1f} samples/s   ratio {samples / wall / bare:.3f} "
          "(target >= 0.9; includes task start-up and model loading per shard)")


if __name__ == "__main__":
    main()
