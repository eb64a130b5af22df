"""The pipeline's stages in order: one explicit table that flows/, the CLI and the benchmarks share.

A stage is one function of the config that returns a small summary dict, one DVC stage of the same name in
dvc.yaml, one flow `flows/<name>.py`, and the outputs `ulcore.layout` names for it (docs/design.md §2). The two
training stages also carry the `StageSpec` the shared Ray Train loop trains (ulcore/train/loop.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ulcore import layout
from ulcore.config import Config
from ulcore.data.sharding import run_shard
from ulcore.eval.evaluate import run_evaluate
from ulcore.eval.reference import run_reference
from ulcore.run_lock import stage_lock
from ulcore.train import stage1, stage2
from ulcore.train.encode import run_encode
from ulcore.train.loop import StageSpec


@dataclass(frozen=True)
class Stage:
    name: str  # the DVC stage, the flow module flows/<name>.py, the run lock and the MLflow run's `stage` tag
    run: Callable[[Config], dict[str, Any]]  # the stage itself: reads its inputs, writes its outputs
    spec: StageSpec | None = None  # training stages: what the shared loop trains

    @property
    def outputs(self) -> tuple[str, ...]:
        """What it writes, relative to storage.root (dvc.yaml's outs, metrics and plots)."""
        return layout.STAGE_OUTPUTS[self.name]

    @property
    def inputs(self) -> tuple[str, ...]:
        """Other stages' outputs it reads, relative to storage.root (dvc.yaml's data deps)."""
        return layout.STAGE_INPUTS[self.name]


STAGES: tuple[Stage, ...] = (
    Stage("shard", run_shard),
    Stage("reference", run_reference),
    Stage("stage1", stage1.run_stage1, stage1.SPEC),
    Stage("encode", run_encode),
    Stage("stage2", stage2.run_stage2, stage2.SPEC),
    Stage("evaluate", run_evaluate),
)
BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}


def run_stage(name: str, cfg: Config) -> dict[str, Any]:
    """Run one stage by its name, holding the storage root's lock for it: a second run of the same stage on the
    same root refuses at once (ulcore.run_lock)."""
    if name not in BY_NAME:
        raise ValueError(f"stage {name!r}: expected one of {', '.join(BY_NAME)}")
    with stage_lock(cfg.storage.root, name):
        return dict(BY_NAME[name].run(cfg) or {})


__all__ = ["Stage", "STAGES", "BY_NAME", "run_stage"]
