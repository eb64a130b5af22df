"""A pipeline on a storage root outside the repository (no DVC up-to-date check there), killed during stage 2 and
rerun with the same command: every stage before stage 2 is skipped as up to date and stage 2 resumes from its
checkpoint. Stage identities come from what a stage was computed from, never from the upstream run's statistics."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowkit import REPO, env_for, smoke_params_yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # two pipeline runs: 19 min measured on a busy 2-core machine

LONG_STAGE2 = ["stage2.total_samples=512"]  # room to kill it between its first checkpoint and its end


def _pipeline(tmp: Path, root: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--params", str(tmp / "params.yaml"),
                             "--set", f"storage.root={root}"], cwd=REPO, env=env_for(tmp, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _checkpoint_samples(root: Path, stage: str) -> list[int]:
    return sorted(json.loads(p.read_text())["samples"] for p in (root / "checkpoints").glob(f"{stage}-*/**/meta.json"))


def test_rerun_after_a_kill_in_stage2_skips_finished_stages_and_resumes_stage2(tmp_path):
    (tmp_path / "params.yaml").write_text(smoke_params_yaml(LONG_STAGE2))
    root = tmp_path / "root"
    first = _pipeline(tmp_path, root)
    deadline = time.monotonic() + 900
    try:
        while not _checkpoint_samples(root, "stage2"):
            assert first.poll() is None, f"pipeline ended before stage 2's first checkpoint:\n{first.stdout.read()}"
            assert time.monotonic() < deadline, "no stage 2 checkpoint within 900 s"
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    print(f"killed in stage 2 after {time.monotonic() - deadline + 900:.0f} s")
    reached = max(_checkpoint_samples(root, "stage2"))
    assert 0 < reached < 512, f"stage 2 had finished ({reached} samples) before the kill"
    stage1_done = (root / "models" / "stage1" / "done.json").read_bytes()
    stage1_checkpoints = _checkpoint_samples(root, "stage1")

    second, start = _pipeline(tmp_path, root), time.monotonic()
    out, _ = second.communicate(timeout=1200)
    print(f"rerun finished in {time.monotonic() - start:.0f} s")
    assert second.returncode == 0, out[-5000:]
    summary = json.loads((root / "data" / "shards" / "summary.json").read_text())
    assert summary["run"]["shards_built"] == 0 and summary["run"]["shards_skipped"] > 0
    assert "[stage1] up to date" in out, out[-5000:]
    assert "[stage1] resumed" not in out and _checkpoint_samples(root, "stage1") == stage1_checkpoints
    assert (root / "models" / "stage1" / "done.json").read_bytes() == stage1_done
    # Ray's workers can outlive the killed driver by a moment and store one more checkpoint: the rerun resumes from
    # the newest one there is, never from 0
    resumed = re.search(r"\[stage2\] resumed at (\d+) samples", out)
    assert resumed, out[-5000:]
    at = int(resumed.group(1))
    assert reached <= at < 512
    assert f"[stage2] finished at 512 samples: {(512 - at) // 32} steps in this run" in out
    assert json.loads((root / "metrics" / "eval.json").read_text())["gfid"] is not None
