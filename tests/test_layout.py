"""The stage contract: dvc.yaml's outs and data deps are the layout's, and the done rule."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from ulcore import layout, storage

DVC_YAML = Path(__file__).resolve().parents[1] / "dvc.yaml"
CODE = ("flows/", "ulcore/")  # deps on code; every other dep is another stage's output


def _paths(entries: list) -> set[str]:
    """dvc.yaml lists a path as a string or as a one-key mapping with options (persist, cache)."""
    return {e if isinstance(e, str) else next(iter(e)) for e in entries or []}


def test_dvc_yaml_outs_and_deps_are_the_layouts():
    stages = yaml.safe_load(DVC_YAML.read_text())["stages"]
    assert set(stages) == set(layout.STAGE_OUTPUTS) == set(layout.STAGE_INPUTS)
    for name, stage in stages.items():
        outs = _paths(stage.get("outs")) | _paths(stage.get("metrics")) | _paths(stage.get("plots"))
        assert outs == set(layout.STAGE_OUTPUTS[name]), name
        data_deps = {d for d in _paths(stage.get("deps")) if not d.startswith(CODE)}
        assert data_deps == set(layout.STAGE_INPUTS[name]), name
    produced = {p for outs in layout.STAGE_OUTPUTS.values() for p in outs}
    assert {p for ins in layout.STAGE_INPUTS.values() for p in ins} <= produced  # every input is some stage's output


def test_locations_are_under_the_storage_root():
    for root in ("/r", "s3://bucket/ul"):
        assert layout.shards(root, "train") == storage.join(root, "data/shards/train")
        assert layout.shards_summary(root) == storage.join(root, "data/shards/summary.json")
        assert layout.latents_stats(root) == storage.join(root, "data/latents/stats.json")
        assert layout.fid_ref(root, "ab12") == storage.join(root, "data/fid_refs/ab12.npz")
        assert layout.done_marker(root, "stage1") == storage.join(root, "models/stage1/done.json")
        assert layout.metrics(root, "eval") == storage.join(root, "metrics/eval.json")
        for stage, outs in layout.STAGE_OUTPUTS.items():  # the named locations are the DVC outputs
            assert all(storage.join(root, out).startswith(root.rstrip("/") + "/") for out in outs), stage
    assert {layout.metrics("r", s) for s in ("stage1", "stage2", "eval", "promotion")} == {
        f"r/{p}" for outs in layout.STAGE_OUTPUTS.values() for p in outs if p.startswith("metrics/")}


def test_digest_is_the_one_existing_runs_recorded():
    """The same 16 hex digits the training, shard and reference markers of earlier versions hold."""
    doc = {"params": {"stage1": {"lr": 0.002}}, "inputs": "abc"}
    assert layout.digest(doc) == hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]
    assert layout.digest({"b": 1, "a": 2}) == layout.digest({"a": 2, "b": 1})


def test_done_rule(tmp_path):
    marker = layout.done_marker(str(tmp_path), "stage1")
    assert layout.recorded_digest(marker) is None and not layout.is_done(marker, "d1")
    storage.write_json(marker, {"digest": "d1", "mlflow_run_id": "r"})
    assert layout.is_done(marker, "d1") and not layout.is_done(marker, "d2")
    assert layout.recorded_digest(marker) == "d1"
