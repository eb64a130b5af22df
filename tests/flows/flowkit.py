"""Helpers for the flow tests and benchmarks/pipeline.py: a hermetic Prefect home, the smoke-scale params,
temporary project copies (git + DVC initialised, git identity set), commands with bounded time."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

# Before anything imports Prefect: a private PREFECT_HOME, no telemetry, quick runner/worker polling.
_HOME = tempfile.mkdtemp(prefix="ul-prefect-home-")
os.environ["PREFECT_HOME"] = _HOME
os.environ.pop("PREFECT_API_URL", None)
for _k, _v in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false",
               "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "true",
               "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
               "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ[_k] = _v
os.environ.pop("MLFLOW_TRACKING_URI", None)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GIT_ENV = {"GIT_AUTHOR_NAME": "ul-test", "GIT_AUTHOR_EMAIL": "ul-test@example.invalid",
           "GIT_COMMITTER_NAME": "ul-test", "GIT_COMMITTER_EMAIL": "ul-test@example.invalid"}

# Smoke scale for the real stages: the whole pipeline in a couple of minutes on 2 CPU cores.
SMOKE = [
    "data.embedded_train_per_class=16", "data.embedded_val_per_class=8",
    "shard.samples_per_shard=64",
    "model.encoder_channels=[16, 32]", "model.decoder_channels=[16, 32]", "model.encoder_blocks=1",
    "model.prior_width=32", "model.prior_depth=1", "model.decoder_width=32", "model.decoder_depth=1",
    "model.base_widths=[32, 64]", "model.base_depths=[1, 1]", "model.heads=2",
    "stage1.batch_size=32", "stage1.total_samples=128", "stage1.warmup_samples=32",
    "stage1.log_every_samples=64", "stage1.ckpt_every_samples=64", "stage1.ema_halflife_samples=64",
    "stage1.eval_batch=16", "stage1.eval_steps=4",
    "stage2.batch_size=32", "stage2.total_samples=128", "stage2.warmup_samples=32",
    "stage2.log_every_samples=64", "stage2.ckpt_every_samples=64", "stage2.ema_halflife_samples=64",
    "stage2.eval_batch=16", "stage2.eval_steps=4",
    "encode.batch_size=64",
    "eval.num_samples=32", "eval.batch_size=16", "eval.base_steps=4", "eval.decoder_steps=4", "eval.grid_size=16",
    "eval.reference_samples=32",
    "stage1.loss_factor=3.0",  # the c_lf the e2e gates' margins (scheduled retrain) were measured with
    "stage1.decay_fraction=0",  # and the constant LR after the warm-up
    "ray.num_cpus=2",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smoke_params_yaml(extra: list[str] | None = None) -> str:
    """params.yaml text with every section resolved at smoke scale (what DVC and the flows both read)."""
    from ulcore.config import load_config

    return load_config(None, [*SMOKE, "storage.root=.", *(extra or [])]).to_yaml()


def env_for(tmp: Path | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ, **GIT_ENV, **extra)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # DVC stage commands use the first python on PATH
    env["PYTHONPATH"] = ""  # the project copy is the cwd; `python -m flows.x` imports from there
    if tmp is not None:
        env["HOME"] = str(tmp / "home")
        (tmp / "home").mkdir(exist_ok=True)
    return env


def sh(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120,
       check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(args, cwd=cwd, env=env or env_for(), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> rc {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


def copy_project(dst: Path, params_yaml: str) -> Path:
    """A copy of the project's code (not its data) as a fresh git + DVC repository, committed."""
    dst.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("ulcore", "flows", "infra"):
        shutil.copytree(REPO / name, dst / name, ignore=ignore)
    for name in ("dvc.yaml", "pyproject.toml", ".gitignore"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, dst / name)
    (dst / "params.yaml").write_text(params_yaml)
    env = env_for()
    sh(["git", "init", "-q", "-b", "main"], dst, env)
    sh([str(BIN / "dvc"), "init", "-q"], dst, env)
    sh(["git", "add", "-A"], dst, env)
    sh(["git", "commit", "-q", "-m", "project copy"], dst, env)
    return dst


# A small raw ImageNet tree (tests of new raw data reaching the pipeline): one class of 4 training images, 1 val.
RAW_CLASS = "train/n00000001"


def raw_image(path: Path, seed: int) -> None:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (16, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=95)


def raw_tree(raw: Path) -> None:
    (raw / RAW_CLASS).mkdir(parents=True)
    (raw / "LOC_synset_mapping.txt").write_text("n00000001 first\n")
    for i in range(4):
        raw_image(raw / RAW_CLASS / f"a{i}.JPEG", i)
    (raw / "val").mkdir()
    raw_image(raw / "val" / "v0.JPEG", 9)
    (raw / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nv0,n00000001 1 2 3 4\n")


def stage_calls(project: Path) -> list[str]:
    """The stages the counting stand-ins (_fake_stages.py) ran since the last call, in order."""
    path = project / "calls.txt"
    calls = path.read_text().split() if path.exists() else []
    path.unlink(missing_ok=True)
    return calls
