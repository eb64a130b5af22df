"""Fixtures for the nets tests: every test taking `m` runs for the tiny and tiny-video presets."""

from __future__ import annotations

import pytest
import torch

from ulcore.config import ModelConfig
from tests.nets.netkit import model_config


@pytest.fixture(params=["tiny", "tiny-video"])
def preset(request) -> str:
    return request.param


@pytest.fixture
def m(preset) -> ModelConfig:
    return model_config(preset)


@pytest.fixture(autouse=True)
def one_thread():
    """Run the nets tests on one intra-op thread: on a shared 2-core machine OpenMP's two threads get preempted
    and small ops run 10-40x slower; one thread keeps these smoke tests fast and their timing stable."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
