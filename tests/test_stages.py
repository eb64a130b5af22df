"""The stage table: one entry per dvc.yaml stage and flow, in pipeline order, with the functions themselves."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ulcore import layout, stages
from ulcore.config import load_config
from ulcore.data.sharding import run_shard
from ulcore.eval.evaluate import run_evaluate
from ulcore.train import stage1, stage2

REPO = Path(__file__).resolve().parents[1]


def test_table_matches_dvc_yaml_layout_and_flows():
    names = [s.name for s in stages.STAGES]
    assert names == list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]) == list(layout.STAGE_OUTPUTS)
    for stage in stages.STAGES:
        assert (REPO / "flows" / f"{stage.name}.py").is_file(), stage.name
        assert stage.outputs == layout.STAGE_OUTPUTS[stage.name] and stage.inputs == layout.STAGE_INPUTS[stage.name]


def test_entries_are_the_functions_and_the_training_specs():
    assert stages.BY_NAME["shard"].run is run_shard and stages.BY_NAME["evaluate"].run is run_evaluate
    assert stages.BY_NAME["stage1"].spec is stage1.SPEC and stages.BY_NAME["stage2"].spec is stage2.SPEC
    assert [s.name for s in stages.STAGES if s.spec] == [s.spec.name for s in stages.STAGES if s.spec]


def test_unknown_stage_is_refused_naming_the_stages(tmp_path):
    with pytest.raises(ValueError, match="stage 'stage3': expected one of raw_manifest, shard, reference, stage1"):
        stages.run_stage("stage3", load_config(None, [f"storage.root={tmp_path}"]))
    assert list(tmp_path.iterdir()) == []  # refused before taking any lock
