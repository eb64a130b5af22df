"""ulcore.tracking against a real MLflow SQLite store in a temp folder: lineage tags, params, nesting,
metrics/artefacts by run id, and the pyfunc registry round trip with an alias."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from ulcore import tracking  # noqa: E402
from ulcore.config import load_config  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store per module: creating its tables takes ~7 s."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture()
def cfg(tmp_path, store, monkeypatch):
    """A config whose storage.root is the module's store; cwd is a temp folder (no git, no dvc.lock)."""
    for var in ("MLFLOW_TRACKING_URI", tracking.PARENT_ENV, tracking.FLOW_RUN_ENV, "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return load_config(None, [f"storage.root={store}", "stage1.lr=0.002"])


def test_tracking_uri_order(cfg, store, monkeypatch):
    assert tracking.tracking_uri(cfg) == f"sqlite:///{store.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri(cfg) == "http://127.0.0.1:5999"
    assert tracking.artifact_location(cfg) is None  # a server picks its own artefact root
    explicit = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, uri="sqlite:////x/y.db"))
    assert tracking.tracking_uri(explicit) == "sqlite:////x/y.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    on_s3 = dataclasses.replace(cfg, storage=dataclasses.replace(cfg.storage, root="s3://bucket/ul"))
    assert tracking.tracking_uri(on_s3) == f"sqlite:///{Path.cwd().resolve()}/mlflow.db"
    assert tracking.artifact_location(on_s3) == "s3://bucket/ul/mlartifacts"


def test_flatten_params_truncates():
    flat = tracking.flatten_params({"a": {"b": 1, "c": [1, 2]}, "d": "x" * 7000, "e": {}})
    assert flat["a.b"] == "1" and flat["a.c"] == "[1, 2]" and flat["e"] == "{}"
    assert len(flat["d"]) == tracking.MAX_PARAM_VALUE and flat["d"].endswith("...")


def test_lineage_outside_git_and_dvc(cfg):
    tags = tracking.lineage_tags(cfg, "stage1")
    assert tags["git_commit"] == "unknown"
    assert tags["dvc_lock_sha256"] == "none"
    assert tags["prefect_flow_run_id"] == "none"
    assert tags["stage"] == "stage1" and tags["preset"] == "tiny" and tags["config_digest"] == cfg.digest()


def test_lineage_inside_git_with_dvc_lock(cfg, tmp_path):
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@e", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@e")
    Path("dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    subprocess.run(["git", "init", "-q"], check=True, env=env)
    subprocess.run(["git", "add", "dvc.lock"], check=True, env=env)
    subprocess.run(["git", "commit", "-q", "-m", "x"], check=True, env=env)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    tags = tracking.lineage_tags(cfg, "encode")
    assert tags["git_commit"] == head and tags["mlflow.source.git.commit"] == head
    import hashlib

    assert tags["dvc_lock_sha256"] == hashlib.sha256(Path("dvc.lock").read_bytes()).hexdigest()


def test_stage_run_nesting_params_metrics_artifacts(cfg, store, tmp_path, monkeypatch):
    monkeypatch.setenv(tracking.FLOW_RUN_ENV, "flow-run-123")
    with tracking.pipeline_run(cfg) as parent:
        assert os.environ[tracking.PARENT_ENV] == parent
        with tracking.stage_run(cfg, "stage1") as run_id:
            assert os.environ["MLFLOW_TRACKING_URI"] == tracking.tracking_uri(cfg)
            tracking.log_metrics(run_id, {"loss": 1.5, "psnr": np.float32(20.0), "note": "skip"}, step=64)
            tracking.log_metrics(run_id, {"loss": 1.25}, step=128)
            tracking.log_image(run_id, np.full((8, 8, 3), 200, np.uint8), "samples/grid.png")
            (tmp_path / "m.json").write_text('{"a": 1}')
            tracking.log_artifact(run_id, tmp_path / "m.json", "metrics")
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots()
            ax.plot([0, 1], [1, 0])
            tracking.log_figure(run_id, fig, "plots/loss.png")
            plt.close(fig)
    assert tracking.PARENT_ENV not in os.environ and "MLFLOW_TRACKING_URI" not in os.environ

    c = tracking.client(tracking.tracking_uri(cfg))
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["prefect_flow_run_id"] == "flow-run-123"
    assert run.data.tags["stage"] == "stage1" and run.data.tags["preset"] == "tiny"
    assert run.data.params["stage1.lr"] == "0.002" and run.data.params["preset"] == "tiny"
    assert run.data.params["model.encoder_channels"] == "[32, 64]"
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "loss")] == [(64, 1.5), (128, 1.25)]
    assert run.data.metrics["psnr"] == 20.0 and "note" not in run.data.metrics
    names = {a.path for a in c.list_artifacts(run_id)}
    assert {"samples", "metrics", "plots"} <= names
    assert [a.path for a in c.list_artifacts(run_id, "metrics")] == ["metrics/m.json"]
    # artefacts live under <storage.root>/mlartifacts
    assert run.info.artifact_uri.startswith((store / "mlartifacts").resolve().as_uri())
    assert c.get_run(parent).info.status == "FINISHED"
    assert c.get_run(parent).data.tags["stage"] == "pipeline"


def test_experiment_opens_as_model_training_with_review_columns_and_named_runs(cfg):
    """MLflow 3's UI opens a GenAI overview unless told otherwise: the experiment kind tag, a saved runs-table
    view with the review columns, links that open it, and run names that say what ran."""
    import json

    with tracking.pipeline_run(cfg) as parent:
        with tracking.stage_run(cfg, "stage1") as run_id:
            pass
    c = tracking.client(tracking.tracking_uri(cfg))
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(exp.tags["mlflow.sharedViewState.ul-review"])
    assert view["selectedColumns"] == view["columnOrder"] == [
        "attributes.`Duration`", "metrics.`bits_per_pixel_prior`", "metrics.`psnr`", "metrics.`gfid`",
        "metrics.`rfid`"]
    assert c.get_run(parent).info.run_name == "pipeline tiny c_lf=8.0 b=2"
    assert c.get_run(run_id).info.run_name == "stage1 tiny c_lf=8.0 b=2"
    assert tracking.experiment_url(cfg) == (f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs"
                                            "?workflowType=machine_learning&viewStateShareKey=ul-review")
    assert tracking.run_url(run_id).endswith(f"/runs/{run_id}?workflowType=machine_learning")


def test_experiments_made_by_earlier_versions_get_the_tags(cfg):
    c = tracking.client(tracking.tracking_uri(cfg))
    old = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, experiment="made-before"))
    mine = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, experiment="kind-set-by-hand"))
    c.create_experiment("made-before")
    c.create_experiment("kind-set-by-hand", tags={"mlflow.experimentKind": "finetuning"})
    for config in (old, mine):
        with tracking.stage_run(config, "stage2"):
            pass
    assert c.get_experiment_by_name("made-before").tags["mlflow.experimentKind"] == "custom_model_development"
    assert "mlflow.sharedViewState.ul-review" in c.get_experiment_by_name("made-before").tags
    assert c.get_experiment_by_name("kind-set-by-hand").tags["mlflow.experimentKind"] == "finetuning"


def test_a_local_run_refuses_an_experiment_whose_artefacts_are_on_s3(cfg):
    """An S3-root run from the same folder made the experiment in ./mlflow.db: a local run says so before training
    instead of failing mid-run on the bucket's credentials."""
    from ulcore.config import ConfigError

    local = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, experiment="made-by-an-s3-run"))
    c = tracking.client(tracking.tracking_uri(local))
    c.create_experiment("made-by-an-s3-run", artifact_location="s3://some-bucket/run/mlartifacts")
    with pytest.raises(ConfigError, match="'made-by-an-s3-run' .* keeps its artefacts at s3://some-bucket/run/"
                                          "mlartifacts, but this run's storage is local"):
        tracking.experiment_url(local)


def test_failed_stage_run_is_marked_failed(cfg):
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.stage_run(cfg, "stage2") as run_id:
            raise RuntimeError("boom")
    assert tracking.client(tracking.tracking_uri(cfg)).get_run(run_id).info.status == "FAILED"


def test_register_model_roundtrip_from_another_process(cfg, tmp_path, monkeypatch):
    """register_model needs only the run id and the tracking URI: run it in a fresh interpreter (as a Ray
    worker would), then load the model through its alias and compare the weights. Registering in process leaves
    MLflow's global URI and the environment as they were."""
    import mlflow
    import torch
    from mlflow.tracking._tracking_service import utils as tracking_utils
    from safetensors.torch import save_file

    global_uri = tracking_utils._tracking_uri
    weights = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}
    save_file(weights, str(tmp_path / "encoder.safetensors"))
    uri = tracking.tracking_uri(cfg)
    with tracking.stage_run(cfg, "stage1") as run_id:
        code = (
            "import sys; from ulcore import tracking\n"
            "v = tracking.register_model(sys.argv[1], 'ul-encoder', {'encoder': sys.argv[2]}, 'latest',"
            " 'model:\\n  latent_channels: 4\\n', tracking_uri=sys.argv[3])\n"
            "print('VERSION', v)\n"
        )
        env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
        env.pop("MLFLOW_TRACKING_URI", None)
        out = subprocess.run([sys.executable, "-c", code, run_id, str(tmp_path / "encoder.safetensors"), uri],
                             capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "VERSION 1" in out.stdout
        # a second version in this process moves the alias
        version = tracking.register_model(run_id, "ul-encoder", {"encoder": str(tmp_path / "encoder.safetensors")},
                                          "champion", "model:\n  latent_channels: 4\n",
                                          tags={tracking.STAGE1_RUN_TAG: run_id})
    assert version == "2"
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_EXPERIMENT_ID" not in os.environ
    assert tracking_utils._tracking_uri == global_uri
    c = tracking.client(uri)
    assert str(c.get_model_version_by_alias("ul-encoder", "latest").version) == "2"  # MLflow's built-in alias
    assert str(c.get_model_version_by_alias("ul-encoder", "champion").version) == "2"
    mv = c.get_model_version("ul-encoder", "2")
    assert mv.run_id == run_id and mv.tags["run_id"] == run_id and mv.tags["preset"] == "tiny"
    assert mv.tags[tracking.STAGE1_RUN_TAG] == run_id

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model("models:/ul-encoder@champion")
    bundle = model.unwrap_python_model()
    assert "latent_channels: 4" in bundle.config_yaml
    assert torch.equal(bundle.state_dicts["encoder"]["w"], weights["w"])
    out = model.predict(["encoder"])
    np.testing.assert_array_equal(out["encoder"]["b"], np.ones(3, np.float32))
    reqs = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model/requirements.txt")).read_text()
    assert "safetensors==" in reqs and "torch==" in reqs and "+cpu" not in reqs


def test_models_pickled_under_the_old_class_path_still_load():
    """Models registered before the class moved to ulcore.bundle name `ulcore.tracking.SafetensorsBundle`."""
    import pickle

    from ulcore.models.pyfunc import SafetensorsBundle

    assert pickle.loads(b"culcore.tracking\nSafetensorsBundle\n.") is SafetensorsBundle
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        tracking.nothing_here  # noqa: B018


@pytest.mark.parametrize("old_module", ["ulcore.tracking", "ulcore.bundle"])
def test_registered_model_pickled_under_an_old_module_loads_through_mlflow(cfg, tmp_path, old_module, monkeypatch):
    """A registered model whose python_model.pkl names the class's module of an earlier version (MLflow pickled
    `SafetensorsBundle` by reference) loads through `mlflow.pyfunc.load_model` and gives its weights."""
    import importlib

    import cloudpickle
    import mlflow
    import torch
    from safetensors.torch import save_file

    from ulcore.models.pyfunc import PICKLED_PATHS, SafetensorsBundle

    assert old_module in PICKLED_PATHS
    save_file({"w": torch.full((2,), 3.0)}, str(tmp_path / "prior.safetensors"))
    name = f"ul-old-{old_module.rsplit('.', 1)[-1]}"
    with tracking.stage_run(cfg, "stage1") as run_id:
        tracking.register_model(run_id, name, {"prior": str(tmp_path / "prior.safetensors")}, "champion",
                                "model:\n  latent_channels: 4\n")
    uri = tracking.tracking_uri(cfg)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    local = Path(mlflow.artifacts.download_artifacts(tracking.client(uri).get_model_version(name, "1").source))
    importlib.import_module(old_module)  # cloudpickle pickles by reference only a class found in a loaded module
    SafetensorsBundle.__module__ = old_module  # pickle the class under the path an earlier version used
    try:
        old_pickle = cloudpickle.dumps(SafetensorsBundle())
    finally:
        SafetensorsBundle.__module__ = "ulcore.models.pyfunc"
    assert old_module.encode() in old_pickle and b"ulcore.models" not in old_pickle
    (local / "python_model.pkl").write_bytes(old_pickle)
    bundle = mlflow.pyfunc.load_model(str(local)).unwrap_python_model()
    assert type(bundle) is SafetensorsBundle
    assert torch.equal(bundle.state_dicts["prior"]["w"], torch.full((2,), 3.0))


def test_training_and_evaluation_modules_import_without_mlflow():
    """MLflow loads only when a process talks to it (~3 s of imports saved in the others, e.g. Ray workers)."""
    code = ("import sys, ulcore.tracking, ulcore.train.stage1, ulcore.train.stage2, ulcore.eval.evaluate\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_processes_creating_one_sqlite_store_at_once_all_succeed(tmp_path):
    """Four processes open a fresh mlflow.db at the same instant (two runs started together on a fresh root):
    without serialising its creation, all but one died in alembic ("duplicate column name")."""
    import time

    script = ("import sys, time\nfrom ulcore import tracking\n"
              "while time.time() < float(sys.argv[2]): time.sleep(0.001)\n"
              "tracking.client(f'sqlite:///{sys.argv[1]}/mlflow.db').search_experiments()")
    start_at = str(time.time() + 20)  # after every interpreter has imported MLflow
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), start_at], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(o[-1500:] for o in outputs)
