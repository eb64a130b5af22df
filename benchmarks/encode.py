"""The encode stage (Ray tasks, one per shard, writing latent shards) vs bare inference loops over the same shards.

    python benchmarks/encode.py [--runs 3]

Fixture: the whole embedded asset (5000 train + 1000 val images) in 12 shards of 500, so every core gets the same
number of shards on 1, 2, 3, 4, 6 or 12 cores (no core idles while another finishes a last shard); freshly
initialised stage-1 nets exported the normal way (throughput does not depend on training).

Every side reads and decodes the same shards and runs the same encoder; the stage also converts to float16,
accumulates channel statistics and writes latent tars. Two baselines:

- bare loop: one process, every core as torch threads (decoding runs on one thread while the others wait);
- parallel bare: one single-threaded process per core on its share of the shards, in a process pool started and
  warmed (imports done) before timing: the stage's own layout without Ray and without writes.

Each run times the stage twice and prints samples/s ratios, stage over each baseline (target >= 0.9 steady, vs the
bare loop):

- cold: the whole stage from a driver without Ray: ray.init, worker processes start and import torch, each worker
  loads the encoder. This is what one `python -m flows.encode` pays once, whatever the data size.
- steady: the stage again right after, with Ray up and its worker pool warm (workers started, modules imported,
  encoder cached per worker), the way every shard after a worker's first runs in a long pass.

Wall time is split into ray.init, the work inside the tasks (encode + write, summed over tasks, per core) and the
rest (worker start and imports, encoder loads, scheduling, idle cores). The machine may be shared by other jobs:
compare ratios within a run, and run it more than once.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from _fixture import sharded_config  # benchmarks/ is sys.path[0] when run as a script
from ulcore import layout, storage
from ulcore.data import loaders
from ulcore.runtime import ensure_ray
from ulcore.data.shards import list_shards, read_stats
from ulcore.train.encode import run_encode
from ulcore.models import export_modules, load_encoder, stage1_root
from ulcore.train.stage1 import Stage1Objective

FIXTURE = ["shard.samples_per_shard=500", "data.embedded_train_per_class=500", "data.embedded_val_per_class=100"]


def bare_loop(cfg, shards: list[str], threads: int) -> tuple[int, float]:
    """Load the encoder, then decode and encode every shard in this process on `threads` torch threads;
    (samples, seconds)."""
    torch.set_num_threads(threads)
    start, seen = time.perf_counter(), 0
    encoder = load_encoder(stage1_root(cfg))
    with torch.inference_mode():
        for batch in loaders.eval_batches(shards, batch_size=cfg.encode.batch_size, kind="images"):
            encoder(loaders.to_float(batch["x"]))
            seen += batch["x"].shape[0]
    return seen, time.perf_counter() - start


def parallel_bare(pool: ProcessPoolExecutor, cfg, shards: list[str], cores: int) -> tuple[int, float]:
    """`bare_loop` single-threaded in each pool process on every `cores`-th shard; (samples, wall seconds)."""
    start = time.perf_counter()
    parts = list(pool.map(bare_loop, [cfg] * cores, [shards[i::cores] for i in range(cores)], [1] * cores))
    return sum(n for n, _ in parts), time.perf_counter() - start


def stage(cfg) -> tuple[int, float, float, float]:
    """One encode run from scratch (previous latents removed); (samples, wall, ray.init, in-task seconds summed)."""
    storage.remove(layout.latents(cfg.storage.root))
    start = time.perf_counter()
    ensure_ray(cfg.ray)  # run_encode's first step, timed on its own (a no-op when Ray is up)
    init = time.perf_counter() - start
    result = run_encode(cfg)
    wall = time.perf_counter() - start
    in_task = sum(read_stats(u)["seconds"] for u in storage.list_uris(layout.latents(cfg.storage.root), ".tar"))
    return sum(v["samples"] for v in result["stats"]["splits"].values()), wall, init, in_task


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    cfg = sharded_config(FIXTURE)
    ray.shutdown()  # the shard stage leaves a Ray cluster up: the cold run must start its own
    torch.manual_seed(0)
    objective = Stage1Objective(cfg).eval()
    export_modules({"encoder": objective.encoder, "decoder": objective.decoder, "prior": objective.prior}, cfg,
                   stage1_root(cfg))
    storage.write_json(layout.done_marker(cfg.storage.root, "stage1"), {"digest": "bench"})
    shards = [u for split in cfg.data.splits
              for u in list_shards(layout.shards(cfg.storage.root, split), split)]
    cores = torch.get_num_threads()
    print(f"shards={len(shards)} batch={cfg.encode.batch_size} cores={cores}")
    with ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("spawn")) as pool:
        parallel_bare(pool, cfg, shards[:cores], cores)  # warm the pool: processes started, modules imported
        for run in range(args.runs):
            seen, bare_s = bare_loop(cfg, shards, cores)
            par_n, par_s = parallel_bare(pool, cfg, shards, cores)
            bare, par = seen / bare_s, par_n / par_s
            print(f"run {run}: bare loop {bare:6.1f} samples/s (1 process x {cores} threads), parallel bare "
                  f"{par:6.1f} samples/s ({cores} single-threaded processes)")
            for name in ("cold  ", "steady"):
                n, wall, init, task = stage(cfg)
                assert n == seen == par_n, (n, seen, par_n)
                if name == "cold  ":
                    ray_cpus = int(ray.cluster_resources()["CPU"])
                    assert ray_cpus == cores, f"Ray has {ray_cpus} CPUs, the baselines {cores} cores"
                rest = wall - init - task / cores
                print(f"  stage {name} {n / wall:6.1f} samples/s  ratio {n / wall / bare:.3f} (vs parallel "
                      f"{n / wall / par:.3f})  wall {wall:5.2f}s = ray.init {init:.2f} + in-task {task / cores:.2f} "
                      f"per core + {rest:.2f} worker start, loads, scheduling, idle", flush=True)
            ray.shutdown()


if __name__ == "__main__":
    main()
