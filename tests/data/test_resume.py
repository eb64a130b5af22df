"""Kill the shard stage mid-run, rerun: exactly the samples of an uninterrupted run, none twice, none lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from shard_fixtures import make_kinetics_tree, video_cfg
from ulcore.data.sharding import run_shard


def _keys(folder) -> list[str]:
    keys = []
    for tar in sorted(folder.rglob("*.tar")):
        with tarfile.open(tar) as tf:
            keys += [n.split(".")[0] for n in tf.getnames() if n.endswith(".cls")]
    return keys


@pytest.mark.slow
def test_interrupt_and_resume(ray_session, tmp_path):
    raw = tmp_path / "raw"
    make_kinetics_tree(raw, good=10)
    args = [f"data.root={raw}", "shard.samples_per_shard=1", "shard.max_parallel=1"]
    reference = tmp_path / "reference"
    run_shard(video_cfg(str(raw), str(reference), *args))

    out = tmp_path / "interrupted"
    overrides = ["data.source=kinetics", f"storage.root={out}", "data.resolution=16", "video.frames=4",
                 "video.fps=8.0", "model.frames=4", "data.random_flip=false", f"ray.address={ray_session}", *args]
    cmd = [sys.executable, "-m", "ulcore.data.sharding", "--params", "/nonexistent.yaml"]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    shards = out / "data/shards/train"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(shards.glob("*.stats.json"))) < 3:
        assert proc.poll() is None, "the stage finished before it could be interrupted"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-run; Ray cancels its in-flight task
    proc.wait()
    done_before = len(list(shards.glob("*.stats.json")))
    assert 3 <= done_before < 15 and not (out / "data/shards/summary.json").exists()

    summary = run_shard(video_cfg(str(raw), str(out), *args))
    assert summary["run"]["shards_skipped"] >= done_before
    ref_keys, keys = _keys(reference), _keys(out)
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(ref_keys)
    assert summary["splits"]["train"]["samples"] == 11

    # identity is what the shards hold, never how the run went: the interrupted-then-resumed shards fingerprint
    # like the uninterrupted ones (their write times differ), and a rerun that skips every shard changes nothing
    from ulcore.data.shards import list_shards
    from ulcore.eval.fid import data_fingerprint
    from ulcore.train.loop import input_digest

    uninterrupted = list_shards(str(reference / "data/shards/train"))
    assert data_fingerprint(list_shards(str(shards))) == data_fingerprint(uninterrupted)
    before = input_digest(str(out / "data/shards/summary.json"), "shard")
    again = run_shard(video_cfg(str(raw), str(out), *args))
    assert again["run"]["shards_built"] == 0 and again["run"] != summary["run"]
    assert input_digest(str(out / "data/shards/summary.json"), "shard") == before
