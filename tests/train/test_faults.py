"""Faults during training end in a clear answer: an error a retry cannot fix (divergence, unreadable data) ends the
run after one attempt with its own message; a lost worker (a real kill) is retried from the latest checkpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.train.smoke import SMOKE
from ulcore.config import load_config
from ulcore.data.sharding import run_shard

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ONE_WORKER = ["ray.num_workers=1", "ray.num_cpus=2", "ray.max_failures=2"]
SCRIPT = "import sys; from ulcore.config import load_config; from ulcore.train.stage1 import run_stage1; " \
         "run_stage1(load_config(sys.argv[1], sys.argv[2:]))"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("faults")
    run_shard(load_config(ROOT / "params.yaml", [*SMOKE, *ONE_WORKER, f"storage.root={root}"]))
    ray.shutdown()  # the training subprocesses start their own local cluster
    return root


def _stage1(root: Path, *overrides: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0")  # every attempt's lines, not a summary
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(ROOT / "params.yaml"), *SMOKE, *ONE_WORKER,
                             f"storage.root={root}", *overrides], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _fresh_copy(shards: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(shards / "data", dst / "data")
    return dst


def test_divergence_ends_the_run_after_one_attempt(shards, tmp_path):
    root = _fresh_copy(shards, tmp_path)
    start = time.monotonic()
    out, _ = _stage1(root, "stage1.lr=1e30", "stage1.max_bad_steps=2", "stage1.total_samples=320").communicate(
        timeout=600)
    assert "FloatingPointError: stage1: 2 consecutive non-finite losses; lower stage1.lr" in out, out[-3000:]
    # one attempt, not ray.max_failures + 1: a single worker process ever reached the guard
    assert len(set(re.findall(r"pid=(\d+)\)\S* \[stage1\] non-finite loss at step", out))) == 1, out[-5000:]
    assert "retrying from the latest checkpoint" not in out
    print(f"divergence answered in {time.monotonic() - start:.0f} s")


def test_an_unreadable_shard_fails_training_at_once_naming_it_or_is_counted_when_allowed(shards, tmp_path):
    root = _fresh_copy(shards, tmp_path)
    bad = sorted((root / "data" / "shards" / "train").glob("train-*.tar"))[1]
    bad.write_bytes(np.random.default_rng(0).bytes(bad.stat().st_size))  # garbage; its stats still count it
    out, _ = _stage1(root).communicate(timeout=600)
    assert f"CorruptDataError: {bad}: unreadable shard (ReadError: invalid header); 1 unreadable shard(s) > " \
           "data.max_bad_shards = 0" in out, out[-5000:]
    assert "retrying from the latest checkpoint" not in out and not (root / "metrics" / "stage1.json").exists()

    out, _ = _stage1(root, "data.max_bad_shards=1").communicate(timeout=600)
    assert "bad_shards=1" in out, out[-5000:]  # the status line
    metrics = json.loads((root / "metrics" / "stage1.json").read_text())
    assert metrics["bad_shards"] == 1 and metrics["bad_samples"] == 0
    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{root}/mlflow.db").get_run(metrics["mlflow_run_id"])
    assert run.data.metrics["final_bad_shards"] == 1 and run.data.metrics["bad_shards"] == 1


def _ray_train_workers(session: int) -> list[int]:
    """Pids of the Ray Train worker processes started under the training process's session (not their DataLoader
    workers, forked children that carry the same process title)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.getsid(int(entry.name)) == session and \
                    (entry / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ProcessLookupError):
            continue
    return [pid for pid, parent in parents.items() if parent not in parents]


def test_a_killed_worker_is_retried_from_the_latest_checkpoint(shards, tmp_path):
    root = _fresh_copy(shards, tmp_path)
    run = _stage1(root, "stage1.total_samples=320", "stage1.ckpt_every_samples=64")
    deadline = time.monotonic() + 300
    try:
        while not list((root / "checkpoints").glob("stage1-*/*/meta.json")):
            assert run.poll() is None, f"training ended before its first checkpoint:\n{run.stdout.read()}"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
        workers = _ray_train_workers(run.pid)
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)
        out, _ = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 0, out[-5000:]
    assert "[stage1] attempt 1 failed (" in out and "retrying from the latest checkpoint (1/2 retries used)" in out
    assert "[stage1] resumed at " in out and "[stage1] finished at 320 samples" in out
