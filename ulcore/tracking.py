"""MLflow tracking and model registry: one small helper used by every stage (rank 0 only).

Everything goes through `MlflowClient` with an explicit run id, never through MLflow's "active run", so the
same calls work in the driver, in a Ray Train worker (given the run id and the tracking URI) and inside a
Prefect flow. Lineage (docs/design.md §4): every run carries the git commit, the `dvc.lock` hash, the Prefect
flow-run id, the stage, the preset, the config digest and the params flattened as `section.key`, so any number
on the MLflow UI leads back to the exact code, data and settings.

Where runs go (`tracking_uri`), first match wins:
1. `cfg.tracking.uri` when set (an MLflow server such as http://127.0.0.1:5000, or any backend URI);
2. the `MLFLOW_TRACKING_URI` environment variable (what `infra/stack.sh` gives its Prefect worker);
3. a local SQLite file: `sqlite:///<abs storage.root>/mlflow.db` when `storage.root` is a folder. When
   `storage.root` is `s3://...` the database cannot live there (SQLite needs a local file), so it is
   `sqlite:///<abs cwd>/mlflow.db` while the experiment's artefacts go to `<storage.root>/mlartifacts` on S3
   (MLflow uploads with boto3; `MLFLOW_S3_ENDPOINT_URL` is taken from `storage.s3_endpoint` or
   `AWS_ENDPOINT_URL`). At scale, run an MLflow server with a Postgres backend instead (infra/README.md).

Stage runs nest under the pipeline run when `UL_PARENT_RUN_ID` is set (the `ul` flow sets it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ulcore.config import Config, ConfigError

PARENT_ENV = "UL_PARENT_RUN_ID"  # the pipeline run's id; stage runs become its children
FLOW_RUN_ENV = "UL_PREFECT_FLOW_RUN_ID"  # set by flows/ so ulcore needs no Prefect import
GIT_COMMIT_ENV = "UL_GIT_COMMIT"  # set in a Ray job's env: its copy of the project has no .git
MAX_PARAM_VALUE = 6000  # MLflow 3 limit on a param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)
MAX_TAG_VALUE = 8000
MODEL_ARTIFACT = "model"  # artifact folder of a registered pyfunc model inside its run
STAGE1_RUN_TAG = "stage1_run_id"  # on every registered version: the stage-1 run its lineage starts from
# MLflow 3 opens an experiment on its GenAI overview (traces, token usage) unless it is a model-training one: the
# experiment tag below says so (the UI's "Machine learning" kind), and links carry the UI's workflow type.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_QUERY = "workflowType=machine_learning"
# The runs table's default columns: a view saved on the experiment (the UI's "share view" tag), opened by links.
VIEW_KEY = "ul-review"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
REVIEW_METRICS = ("bits_per_pixel_prior", "psnr", "gfid", "rfid")  # the evaluate run's, also on the pipeline run
REVIEW_COLUMNS = ("attributes.`Duration`", *(f"metrics.`{m}`" for m in REVIEW_METRICS))


# ---------------------------------------------------------------------------------------------- where runs go


def _is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def tracking_uri(cfg: Config) -> str:
    """The MLflow tracking URI for this config (see the module docstring for the order)."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = cfg.storage.root
    folder = Path.cwd() if _is_s3(root) else Path(root).expanduser().resolve()
    return f"sqlite:///{folder / 'mlflow.db'}"


def artifact_location(cfg: Config) -> str | None:
    """Artefact root for a new experiment; None lets an MLflow server choose (its --artifacts-destination)."""
    uri = tracking_uri(cfg)
    if not uri.startswith("sqlite:"):
        return None
    root = cfg.storage.root
    if _is_s3(root):
        return root.rstrip("/") + "/mlartifacts"
    return (Path(root).expanduser().resolve() / "mlartifacts").as_uri()


def _export_s3_endpoint(cfg: Config | None = None) -> None:
    """MLflow's S3 artefact store reads MLFLOW_S3_ENDPOINT_URL; boto3 alone reads AWS_ENDPOINT_URL."""
    endpoint = (cfg.storage.s3_endpoint if cfg is not None else "") or os.environ.get("AWS_ENDPOINT_URL", "")
    if endpoint and not os.environ.get("MLFLOW_S3_ENDPOINT_URL"):
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = endpoint


_CLIENTS: dict[str, Any] = {}
_RUN_URIS: dict[str, str] = {}  # run id -> tracking URI, for runs opened in this process


def client(uri: str | None = None) -> Any:
    """A cached `MlflowClient` for `uri` (default: MLFLOW_TRACKING_URI, else MLflow's own default)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    key = uri or ""
    if key not in _CLIENTS:
        if key.startswith("sqlite:///"):  # two processes creating one database at once: all but one died in alembic
            with _exclusive(key[len("sqlite:///"):] + ".lock"):
                c = MlflowClient(tracking_uri=uri)
                c.search_experiments(max_results=1)  # creates and migrates the schema, one process at a time
        else:
            c = MlflowClient(tracking_uri=uri)
        _CLIENTS[key] = c
    return _CLIENTS[key]


@contextlib.contextmanager
def _exclusive(path: str) -> Iterator[None]:
    """Wait for an exclusive `flock` on `path` (released by the kernel if the holder dies)."""
    import fcntl

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _client_for(run_id: str, uri: str | None) -> Any:
    return client(uri or _RUN_URIS.get(run_id))


def experiment_tags() -> dict[str, str]:
    """Tags that make the MLflow UI a model-training review: the experiment kind and the runs-table view."""
    import json

    view = {"selectedColumns": list(REVIEW_COLUMNS), "columnOrder": list(REVIEW_COLUMNS),
            "orderByKey": "attributes.start_time", "orderByAsc": False}
    return {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, VIEW_TAG: json.dumps(view)}


def _experiment_id(c: Any, name: str, location: str | None) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            return c.create_experiment(name, artifact_location=location, tags=experiment_tags())
        except Exception:  # another process created it between the lookup and here
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
    if location is not None and not _is_s3(location) and _is_s3(exp.artifact_location or ""):
        # an S3-root run from this folder made the experiment (its store defaults to ./mlflow.db): this local run's
        # artefacts would go to that bucket, and fail there mid-training without its credentials
        raise ConfigError(f"MLflow experiment '{name}' in {c.tracking_uri} keeps its artefacts at "
                          f"{exp.artifact_location}, but this run's storage is local ({location}); set "
                          "tracking.experiment to another name, or tracking.uri to another store")
    if exp.lifecycle_stage == "deleted":
        c.restore_experiment(exp.experiment_id)
    for key, value in experiment_tags().items():  # experiments made by earlier versions get them too; a kind
        if key == VIEW_TAG and exp.tags.get(key) != value or key not in exp.tags:  # set by hand is kept
            c.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


# ---------------------------------------------------------------------------------------------- lineage


def git_commit(cwd: str | Path | None = None) -> str:
    """HEAD of the git repository around `cwd` (default: the working directory); outside one, the commit the code
    was shipped at (UL_GIT_COMMIT: a Ray job's copy, the image's build arg), or "unknown"."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path.cwd(), capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return os.environ.get(GIT_COMMIT_ENV) or "unknown"


def dvc_lock_hash(cwd: str | Path | None = None) -> str:
    """sha256 of `dvc.lock` in `cwd` (the DVC pipeline state the run started from), or "none"."""
    lock = Path(cwd or Path.cwd()) / "dvc.lock"
    return hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else "none"


def prefect_flow_run_id() -> str:
    """The Prefect flow run we are inside: flows/ export it; otherwise ask Prefect only if it is loaded."""
    if os.environ.get(FLOW_RUN_ENV):
        return os.environ[FLOW_RUN_ENV]
    if "prefect" in sys.modules:
        try:
            from prefect.runtime import flow_run

            if flow_run.id:
                return str(flow_run.id)
        except Exception:  # noqa: BLE001 - lineage must never break a stage
            pass
    return "none"


def flatten_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"stage1": {"lr": 1e-3}}` -> `{"stage1.lr": "0.001"}`; values cut to MLflow's length limit."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
        else:
            text = str(value)
            flat[name] = text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."
    return flat


def run_name(cfg: Config, stage: str) -> str:
    """What the runs table shows: the stage, the preset and the two stage-1 knobs that set the latent's rate."""
    return f"{stage} {cfg.preset} c_lf={cfg.stage1.loss_factor} b={cfg.stage1.decoder_bias:g}"


def lineage_tags(cfg: Config, stage: str) -> dict[str, str]:
    commit = git_commit()
    tags = {
        "stage": stage,
        "preset": cfg.preset,
        "config_digest": cfg.digest(),
        "git_commit": commit,
        "dvc_lock_sha256": dvc_lock_hash(),
        "prefect_flow_run_id": prefect_flow_run_id(),
        "storage_root": cfg.storage.root,
        "mlflow.runName": run_name(cfg, stage),
        "mlflow.source.type": "JOB",
    }
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    if os.environ.get("DVC_EXP_NAME"):  # set by `dvc exp run` for the stage commands it runs
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


# ---------------------------------------------------------------------------------------------- runs


@contextlib.contextmanager
def environ_restored(*keys: str) -> Iterator[None]:
    """The environment variables `keys` as they were before the block (set, changed or removed inside it)."""
    saved = {key: os.environ.get(key) for key in keys}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def stage_run(cfg: Config, stage: str, name: str | None = None) -> Iterator[str]:
    """Open an MLflow run for one stage and yield its id; FINISHED on success, FAILED on an exception. `name` is
    what the runs table shows (default: run_name).

    The run is a child of `$UL_PARENT_RUN_ID` when set. While it is open, `MLFLOW_TRACKING_URI` is exported so
    processes started meanwhile (a local Ray cluster's workers) log to the same place.
    """
    from mlflow.entities import Param, RunTag

    _export_s3_endpoint(cfg)
    uri = tracking_uri(cfg)
    c = client(uri)
    exp_id = _experiment_id(c, cfg.tracking.experiment, artifact_location(cfg))
    tags = lineage_tags(cfg, stage)
    if name:
        tags["mlflow.runName"] = name
    parent = os.environ.get(PARENT_ENV, "")
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = c.create_run(exp_id, run_name=tags["mlflow.runName"], tags=tags)
    run_id = run.info.run_id
    _RUN_URIS[run_id] = uri
    params = flatten_params({"preset": cfg.preset, **cfg.to_dict()})
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        c.log_batch(run_id, params=items[start:start + 100])
    c.log_batch(run_id, tags=[RunTag("config_yaml", cfg.to_yaml()[:MAX_TAG_VALUE])])
    status = "FAILED"
    try:
        with environ_restored("MLFLOW_TRACKING_URI"):
            os.environ["MLFLOW_TRACKING_URI"] = uri
            yield run_id
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        c.set_terminated(run_id, status=status)


@contextlib.contextmanager
def pipeline_run(cfg: Config, stage: str = "pipeline", name: str | None = None) -> Iterator[str]:
    """The parent run of a whole pipeline (or of a study, or of one of its settings): runs opened inside become its
    children."""
    with stage_run(cfg, stage, name) as run_id, environ_restored(PARENT_ENV):
        os.environ[PARENT_ENV] = run_id
        yield run_id


def run_url(run_id: str, tracking_uri: str | None = None) -> str:
    """A link to the run: the server's UI page, or the `mlflow ui` page for a local SQLite store."""
    c = _client_for(run_id, tracking_uri)
    exp_id = c.get_run(run_id).info.experiment_id
    return f"{_ui_base(c.tracking_uri)}/#/experiments/{exp_id}/runs/{run_id}?{UI_QUERY}"


def _ui_base(uri: str) -> str:
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def experiment_url(cfg: Config) -> str:
    """The experiment's runs table with the review columns (the saved view), as a model-training experiment."""
    uri = tracking_uri(cfg)
    c = client(uri)
    exp_id = _experiment_id(c, cfg.tracking.experiment, artifact_location(cfg))
    return f"{_ui_base(uri)}/#/experiments/{exp_id}/runs?{UI_QUERY}&viewStateShareKey={VIEW_KEY}"


def ui_command(cfg: Config) -> str:
    """The command that opens the MLflow UI on this config's runs."""
    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


# ---------------------------------------------------------------------------------------------- logging


def log_metrics(run_id: str, metrics: Mapping[str, Any], step: int = 0, *, tracking_uri: str | None = None) -> None:
    """Log numeric metrics at `step` (samples seen, by convention); non-numeric values are skipped."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = []
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        batch.append(Metric(key, number, now, int(step)))
    c = _client_for(run_id, tracking_uri)
    for start in range(0, len(batch), 1000):
        c.log_batch(run_id, metrics=batch[start:start + 1000])


def log_image(run_id: str, image: Any, artifact_file: str, *, tracking_uri: str | None = None) -> None:
    """Log a uint8 HWC (or HW) array as an image artefact, e.g. `samples/step_004096.png`."""
    import numpy as np

    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"log_image expects uint8 pixels, got {array.dtype}")
    _client_for(run_id, tracking_uri).log_image(run_id, array, artifact_file=artifact_file)


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None, *,
                 tracking_uri: str | None = None) -> None:
    """Log a local file, or every file under a local folder."""
    c = _client_for(run_id, tracking_uri)
    if Path(path).is_dir():
        c.log_artifacts(run_id, str(path), artifact_path)
    else:
        c.log_artifact(run_id, str(path), artifact_path)


def log_figure(run_id: str, fig: Any, artifact_file: str, *, tracking_uri: str | None = None) -> None:
    """Log a matplotlib figure, e.g. `plots/loss.png`."""
    _client_for(run_id, tracking_uri).log_figure(run_id, fig, artifact_file)


# ---------------------------------------------------------------------------------------------- registry


def __getattr__(name: str) -> Any:
    """`SafetensorsBundle` lives in ulcore.models.pyfunc (importing it imports mlflow.pyfunc, ~3 s); models
    registered before it moved unpickle as `ulcore.tracking.SafetensorsBundle`, which resolves here."""
    if name == "SafetensorsBundle":
        from ulcore.models.pyfunc import SafetensorsBundle

        return SafetensorsBundle
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in ("mlflow", "torch", "safetensors", "numpy", "pyyaml"):
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


@contextlib.contextmanager
def _mlflow_globals(uri: str, experiment_id: str) -> Iterator[None]:
    """MLflow's global tracking URI and experiment set to these while the block runs, then all as they were.

    `mlflow.set_tracking_uri` also exports `MLFLOW_TRACKING_URI` (for subprocesses) and keeps a module global, so
    restoring with it alone would leave the variable set where it was absent before: a later stage or subprocess of
    this process would log to this store. Both the global and the variables come back exactly.
    """
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_global = tracking_utils._tracking_uri
    with environ_restored("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
        tracking_utils.set_tracking_uri(uri)
        os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
        try:
            yield
        finally:
            tracking_utils.set_tracking_uri(saved_global)


def register_model(run_id: str, name: str, files: Mapping[str, str], alias: str, config_yaml: str, *,
                   tags: Mapping[str, str] | None = None, tracking_uri: str | None = None) -> str:
    """Log `files` (key -> local .safetensors path) + config as a pyfunc model in the run, register it as
    `name`, point `alias` at the new version, set `tags` on it (with the run's lineage tags) and return the
    version number (a string, as MLflow gives it).

    `config_yaml` is the YAML text of the resolved config, or a path to such a file. The alias "latest" is
    reserved by MLflow and needs no setting: `models:/<name>@latest` already resolves to the newest version.
    """
    import mlflow
    from mlflow.models import Model

    from ulcore.models.pyfunc import SafetensorsBundle

    uri = tracking_uri or _RUN_URIS.get(run_id) or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    c = client(uri)
    run = c.get_run(run_id)
    _export_s3_endpoint()
    with tempfile.TemporaryDirectory(prefix="ul-register-") as tmp:
        config_path = Path(config_yaml) if len(config_yaml) < 4096 and "\n" not in config_yaml else None
        if config_path is None or not config_path.is_file():
            config_path = Path(tmp) / "config.yaml"
            config_path.write_text(config_yaml)
        artifacts = {key: str(Path(path).resolve()) for key, path in files.items()}
        if "config" in artifacts:
            raise ValueError("files must not use the key 'config' (reserved for the config YAML)")
        artifacts["config"] = str(config_path.resolve())
        # Model.log takes an explicit run id (pyfunc.log_model only knows the active run); the logged-model
        # record goes to the run's experiment.
        with _mlflow_globals(uri, run.info.experiment_id):
            info = Model.log(
                artifact_path=None, name=MODEL_ARTIFACT, flavor=mlflow.pyfunc, run_id=run_id,
                python_model=SafetensorsBundle(), artifacts=artifacts, pip_requirements=_requirements(),
                registered_model_name=name, await_registration_for=60,
            )
    version = str(info.registered_model_version)
    if alias.lower() != "latest":  # MLflow reserves "latest": it always resolves to the newest version
        c.set_registered_model_alias(name, alias, version)
    c.set_model_version_tag(name, version, "run_id", run_id)
    for key in ("git_commit", "dvc_lock_sha256", "config_digest", "preset"):
        if key in run.data.tags:
            c.set_model_version_tag(name, version, key, run.data.tags[key])
    for key, value in (tags or {}).items():
        c.set_model_version_tag(name, version, key, value)
    return version


__all__ = [
    "tracking_uri", "artifact_location", "client", "stage_run", "pipeline_run", "run_url", "experiment_url",
    "ui_command", "run_name", "experiment_tags", "environ_restored",
    "log_metrics", "log_image", "log_artifact", "log_figure", "register_model", "SafetensorsBundle",
    "flatten_params", "lineage_tags", "git_commit", "dvc_lock_hash", "prefect_flow_run_id", "PARENT_ENV",
    "FLOW_RUN_ENV", "STAGE1_RUN_TAG",
]
