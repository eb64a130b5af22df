"""The pipeline's stages in order: one explicit table that flows/, the CLI and the benchmarks share.

A stage is one function of the config that returns a small summary dict, one DVC stage of the same name in
dvc.yaml, one flow `flows/<name>.py`, and the outputs `ulcore.layout` names for it (docs/design.md §2). The two
training stages also carry the `StageSpec` the shared Ray Train loop trains (ulcore/train/loop.py).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from ulcore import jobs, layout
from ulcore.config import Config, load_config
from ulcore.data.manifest import run_raw_manifest
from ulcore.data.sharding import run_shard
from ulcore.eval.evaluate import run_evaluate
from ulcore.eval.reference import run_reference
from ulcore.promotion import run_promote
from ulcore.run_lock import stage_lock
from ulcore.runtime import ensure_ray
from ulcore.train import stage1, stage2
from ulcore.train.encode import run_encode
from ulcore.train.loop import StageSpec


@dataclass(frozen=True)
class Stage:
    name: str  # the DVC stage, the flow module flows/<name>.py, the run lock and the MLflow run's `stage` tag
    run: Callable[[Config], dict[str, Any]]  # the stage itself: reads its inputs, writes its outputs
    spec: StageSpec | None = None  # training stages: what the shared loop trains
    # works in the calling process (no Ray tasks or Train workers of its own): on a cluster it runs as one Ray
    # task with a training worker's resources, so that the job's driver on the head node only waits
    in_process: bool = False

    @property
    def outputs(self) -> tuple[str, ...]:
        """What it writes, relative to storage.root (dvc.yaml's outs, metrics and plots)."""
        return layout.STAGE_OUTPUTS[self.name]

    @property
    def inputs(self) -> tuple[str, ...]:
        """Other stages' outputs it reads, relative to storage.root (dvc.yaml's data deps)."""
        return layout.STAGE_INPUTS[self.name]


STAGES: tuple[Stage, ...] = (
    Stage("raw_manifest", run_raw_manifest),  # a listing: on a cluster it runs in the job's driver itself
    Stage("shard", run_shard),
    Stage("reference", run_reference, in_process=True),
    Stage("stage1", stage1.run_stage1, stage1.SPEC),
    Stage("encode", run_encode),
    Stage("stage2", stage2.run_stage2, stage2.SPEC),
    Stage("evaluate", run_evaluate, in_process=True),
    # re-evaluates the champion when the protocol changed (new data): a training worker's resources then
    Stage("promote", run_promote, in_process=True),
)
BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}


def run_stage(name: str, cfg: Config, *, on_line: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one stage by its name, holding the storage root's lock for it: a second run of the same stage on the
    same root refuses at once (ulcore.run_lock). With `ray.address` a cluster's Jobs endpoint (http://head:8265)
    the stage runs there as a Ray job and `on_line` gets its log (ulcore.jobs); otherwise it runs here."""
    if name not in BY_NAME:
        raise ValueError(f"stage {name!r}: expected one of {', '.join(BY_NAME)}")
    address = cfg.ray.address
    if jobs.is_jobs_endpoint(address):
        return jobs.submit_stage(cfg, name, on_line=on_line)  # holds the lock while the job runs
    jobs.refuse_ray_client(address)
    if address:  # joining a cluster from here: the same rule as for a job
        ensure_ray(cfg.ray)
        jobs.refuse_local_state(cfg, len([n for n in ray.nodes() if n["Alive"]]))
    with stage_lock(cfg.storage.root, name):
        return dict(BY_NAME[name].run(cfg) or {})


def run_in_job(name: str, cfg: Config) -> dict[str, Any]:
    """Inside a stage's Ray job (the submitter holds the lock): run it on the cluster the job's driver is on."""
    stage = BY_NAME[name]
    if not stage.in_process:
        return dict(stage.run(cfg) or {})
    ensure_ray(cfg.ray)
    task = ray.remote(stage.run).options(num_cpus=cfg.ray.cpus_per_worker, num_gpus=1 if cfg.ray.use_gpu else 0,
                                         max_retries=0)
    return dict(ray.get(task.remote(cfg)) or {})


def main(argv: list[str] | None = None) -> int:
    """`python -m ulcore.stages <stage> <resolved config>`: a stage's Ray job entrypoint (ulcore.jobs)."""
    name, config = argv if argv is not None else sys.argv[1:]
    result = run_in_job(name, load_config(config, ["ray.address=auto"]))
    print(jobs.RESULT_MARK + json.dumps(result, default=str), flush=True)
    return 0


__all__ = ["Stage", "STAGES", "BY_NAME", "run_stage", "run_in_job"]

if __name__ == "__main__":
    raise SystemExit(main())
