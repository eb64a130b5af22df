"""Shared set-up for the training benchmarks: embedded shards under a temp storage root (real data, real tars)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ulcore.config import Config, load_config
from ulcore.data.sharding import run_shard

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def sharded_config(overrides: list[str]) -> Config:
    """Shard the embedded dataset (default size) into a fresh temp root and return the config pointing at it."""
    root = tempfile.mkdtemp(prefix="ul-bench-")
    cfg = load_config(PARAMS, [f"storage.root={root}", *overrides])
    run_shard(cfg)
    return cfg
