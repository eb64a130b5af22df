"""The study's settings, their storage roots linked to the shared shards and references, and the resume marker."""

from __future__ import annotations

import os

import pytest

from ulcore import storage
from ulcore.config import ConfigError, load_config
from ulcore.study import plan


def test_settings_sweep_then_compare_lambda0_with_duplicates_run_once():
    got = plan.settings(load_config(None, ["stage1.loss_factor=3.0"]))  # a preset c_lf inside the sweep
    assert [s.slug for s in got] == ["clf1.3_lambda5", "clf1.7_lambda5", "clf2.1_lambda5", "clf3_lambda5",
                                     "clf3_lambda10"]
    assert [s.slug for s in got if s.stage2] == ["clf3_lambda5"]  # the base-vs-prior setting only
    assert got[0].stages == ("stage1", "evaluate") and got[3].stages == ("stage1", "encode", "stage2", "evaluate")
    cfg = load_config(None, got[4].overrides)
    assert (cfg.stage1.loss_factor, cfg.model.logsnr_0, cfg.eval.prior_gfid) == (3.0, 10.0, True)
    other = plan.settings(load_config(None, []))  # tiny's c_lf 8 lies outside the sweep: one more setting
    assert len(other) == 6 and [s.slug for s in other if s.stage2] == ["clf8_lambda5"]
    assert other[-1].slug == "clf8_lambda10"
    with pytest.raises(ConfigError, match="each needs at least one value"):
        plan.settings(load_config(None, []), loss_factors=())


def test_study_needs_a_local_root():
    with pytest.raises(ConfigError, match="storage.root = s3://b/p: the study links"):
        plan.study_root(load_config(None, ["storage.root=s3://b/p"]))


def test_link_shared_is_relative_idempotent_and_never_replaces_a_real_folder(tmp_path):
    shared, root = tmp_path / "study" / "shared", tmp_path / "study" / "quick" / "clf1.3_lambda5"
    (shared / "data" / "shards" / "train").mkdir(parents=True)
    (shared / "data" / "shards" / "train" / "train-000000.tar").write_bytes(b"x")
    plan.link_shared(str(root), str(shared))
    plan.link_shared(str(root), str(shared))
    assert os.readlink(root / "data" / "shards") == "../../../shared/data/shards"
    assert storage.list_uris(str(root / "data" / "shards" / "train")) == [
        str(root / "data" / "shards" / "train" / "train-000000.tar")]
    assert (root / "data" / "fid_refs").resolve() == (shared / "data" / "fid_refs").resolve()
    os.unlink(root / "data" / "fid_refs")
    os.symlink(str(tmp_path), root / "data" / "fid_refs")  # pointing elsewhere: re-pointed
    plan.link_shared(str(root), str(shared))
    assert os.readlink(root / "data" / "fid_refs") == "../../../shared/data/fid_refs"
    own = tmp_path / "own"
    (own / "data" / "shards").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="a folder of its own"):
        plan.link_shared(str(own), str(shared))


def test_marker_matches_config_and_data_but_not_execution_only_sections(tmp_path):
    root = tmp_path / "s"
    storage.write_json(str(root / "data" / "shards" / "summary.json"), {"splits": {"train": {"shards": ["a"]}}})
    setting = plan.Setting(1.3, 5.0)
    cfg = load_config(None, [f"storage.root={root}", *setting.overrides])
    assert plan.finished(cfg) is None
    plan.record(cfg, setting, {"psnr": 15.0}, "run-1", 12.0)
    assert plan.finished(cfg)["metrics"] == {"psnr": 15.0} and plan.finished(cfg)["mlflow_run_id"] == "run-1"
    moved = load_config(None, [f"storage.root={root}", *setting.overrides, "tracking.experiment=x", "ray.num_cpus=1"])
    assert plan.finished(moved) is not None
    assert plan.finished(load_config(None, [f"storage.root={root}", "stage1.loss_factor=1.7"])) is None
    storage.write_json(str(root / "data" / "shards" / "summary.json"), {"splits": {"train": {"shards": ["a", "b"]}}})
    assert plan.finished(cfg) is None  # new data: measure again
