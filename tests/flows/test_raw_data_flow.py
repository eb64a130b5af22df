"""New raw data reaches the pipeline: the `ul` flow (real raw_manifest and shard stages, stand-ins after them, real
DVC) skips sharding while the raw data is unchanged and reshards, incrementally, after a raw file is added; on an
s3:// root, where DVC recording is off, the shard flow does the same by the shards' own digests."""

from __future__ import annotations

import json
import sys

import pytest

from flowkit import RAW_CLASS as A
from flowkit import copy_project, env_for, raw_image, raw_tree, sh, smoke_params_yaml, stage_calls

pytestmark = pytest.mark.usefixtures("prefect_harness")

@pytest.mark.slow  # three pipeline runs through DVC: ~1 min on a busy 2-core machine
def test_pipeline_reshards_after_new_raw_data_and_skips_otherwise(tmp_path, monkeypatch, stand_ins_after_shard):
    from flows.pipeline import ul

    raw = tmp_path / "raw"
    raw_tree(raw)
    project = copy_project(tmp_path / "proj", smoke_params_yaml(
        ["data.source=imagenet", f"data.root={raw}", "data.resolution=16", "shard.samples_per_shard=2"]))
    monkeypatch.chdir(project)
    first = ul(return_state=True)
    assert first.is_completed(), first.message
    assert first.result()["stages"]["shard"]["run"]["shards_built"] == 3  # train 2 + val 1
    assert stage_calls(project) == ["reference", "stage1", "encode", "stage2", "evaluate", "promote"]
    shards = project / "data/shards/train"
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards.iterdir()}

    same = ul(return_state=True).result()
    assert same["stages"]["raw_manifest"]["changed"] is False
    assert same["stages"]["shard"] == {"skipped": "up to date in dvc.lock"} and stage_calls(project) == []

    raw_image(raw / A / "a4.JPEG", 5)
    grown = ul(return_state=True).result()
    assert grown["stages"]["raw_manifest"]["changed"] is True
    run = grown["stages"]["shard"]["run"]
    assert run["shards_built"] == 1 and run["shards_skipped"] == 3 and run["shards_removed"] == 0
    # what reads data/shards (the stand-ins wrote the same latents and metrics, so stage2 and promote stay up to date)
    assert stage_calls(project) == ["reference", "stage1", "encode", "evaluate"]
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards.iterdir() if p.name in kept} == kept
    assert sorted(p.name for p in shards.iterdir() if p.name not in kept) == ["train-000002.stats.json",
                                                                              "train-000002.tar"]
    status = sh([sys.executable, "-m", "dvc", "status", "--json"], project, env_for())
    assert json.loads(status.stdout) == {"raw_manifest": ["always changed"]}  # recorded: shard up to date


def test_shard_flow_on_s3_reshards_by_the_shards_digests(tmp_path, s3_bucket, local_ray):
    from flows.shard import shard
    from ulcore import storage

    raw = tmp_path / "raw"
    raw_tree(raw)
    for path in sorted(p for p in raw.rglob("*") if p.is_file()):
        storage.upload_file(str(path), f"{s3_bucket}/raw/{path.relative_to(raw)}")
    (tmp_path / "params.yaml").write_text(smoke_params_yaml())
    overrides = ["data.source=imagenet", f"data.root={s3_bucket}/raw", f"storage.root={s3_bucket}/run",
                 "data.resolution=16", "shard.samples_per_shard=2"]
    params = str(tmp_path / "params.yaml")
    assert shard(params=params, overrides=overrides)["run"]["shards_built"] == 3
    assert shard(params=params, overrides=overrides)["run"]["shards_built"] == 0
    raw_image(raw / A / "a4.JPEG", 5)
    storage.upload_file(str(raw / A / "a4.JPEG"), f"{s3_bucket}/raw/{A}/a4.JPEG")
    grown = shard(params=params, overrides=overrides)
    assert grown["run"]["shards_built"] == 1 and grown["run"]["shards_skipped"] == 3
    assert [e["shard"] for e in grown["splits"]["train"]["index"]] == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar"]
