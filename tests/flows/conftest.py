"""Fixtures for the flow tests (helpers live in flowkit.py; importing it sets a private PREFECT_HOME)."""

from __future__ import annotations

import dataclasses

import pytest

import flowkit  # noqa: F401  (sets the hermetic environment before anything imports Prefect)


@pytest.fixture(scope="session")
def prefect_harness():
    """An in-process temporary Prefect API for flows called directly (ephemeral mode)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture()
def local_ray():
    """The shard stage starts a local Ray in this process: a fresh one, whose workers start in this test's working
    directory (storage.root=. is relative to it) with this test's environment, stopped afterwards."""
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


@pytest.fixture()
def stand_ins_after_shard(monkeypatch, local_ray):
    """Real raw_manifest and shard stages; the stages after them are the counting stand-ins (_fake_stages.py)."""
    import _fake_stages

    from ulcore import stages

    for stage in stages.STAGES[2:]:
        monkeypatch.setitem(stages.BY_NAME, stage.name,
                            dataclasses.replace(stage, run=getattr(_fake_stages, "run_" + stage.name)))
    monkeypatch.delenv("UL_FAKE_FAIL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
