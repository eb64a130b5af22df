"""Stand-ins for the ulcore stage functions (flow-wrapper tests): each writes the outputs dvc.yaml declares,
opens a real MLflow stage run, counts its calls in calls.txt (and the flow heartbeat interval it ran under in
heartbeats.txt) and fails when UL_FAKE_FAIL names it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect.settings import get_current_settings

from ulcore import tracking

OUTS = {"raw_manifest": ["data/raw_manifest.json"], "shard": ["data/shards/train/train-000000.tar"],
        "reference": ["data/fid_refs/0123456789abcdef.npz"],
        "stage1": ["models/stage1/encoder.safetensors"],
        "encode": ["data/latents/train/train-000000.tar"], "stage2": ["models/stage2/base.safetensors"],
        "evaluate": ["outputs/samples.png", "plots/rd.csv"], "promote": []}
METRICS = {"stage1": "metrics/stage1.json", "stage2": "metrics/stage2.json", "evaluate": "metrics/eval.json",
           "promote": "metrics/promotion.json"}


def _run(stage: str, cfg) -> dict:
    root = Path(cfg.storage.root)
    with open(root / "calls.txt", "a") as f:
        f.write(stage + "\n")
    with open(root / "heartbeats.txt", "a") as f:
        f.write(f"{stage} {get_current_settings().flows.heartbeat_frequency}\n")
    with tracking.stage_run(cfg, stage) as run_id:
        if os.environ.get("UL_FAKE_FAIL") == stage:
            raise RuntimeError(f"fake failure in {stage}")
        for rel in OUTS[stage]:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(f"{stage} {cfg.digest()}\n")
        result = {"stage": stage, "written": len(OUTS[stage]), "loss": 0.5}
        if stage in METRICS:
            (root / METRICS[stage]).parent.mkdir(parents=True, exist_ok=True)
            (root / METRICS[stage]).write_text(json.dumps({"loss": 0.5, "psnr": 21.0}))
            tracking.log_metrics(run_id, {"loss": 0.5}, step=1)
    return {**result, "markdown": f"**fake {stage}** done"}


def run_raw_manifest(cfg): return _run("raw_manifest", cfg)
def run_shard(cfg): return _run("shard", cfg)
def run_reference(cfg): return _run("reference", cfg)
def run_stage1(cfg): return _run("stage1", cfg)
def run_encode(cfg): return _run("encode", cfg)
def run_stage2(cfg): return _run("stage2", cfg)
def run_evaluate(cfg): return _run("evaluate", cfg)
def run_promote(cfg): return _run("promote", cfg)
