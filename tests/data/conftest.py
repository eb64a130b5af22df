"""Data-test fixtures: one Ray session for the whole run, and the raw trees (built once per session)."""

from __future__ import annotations

import pytest
from shard_fixtures import make_imagenet_tree, make_kinetics_tree

from ulcore.config import RayConfig


@pytest.fixture(scope="session")
def ray_session():
    """Ray costs ~4 s to start: share one local cluster between every test that shards."""
    import ray

    from ulcore.runtime import ensure_ray

    ensure_ray(RayConfig(num_cpus=2))
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def imagenet_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    return root, make_imagenet_tree(root)


@pytest.fixture(scope="session")
def kinetics_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinetics")
    return root, make_kinetics_tree(root)
