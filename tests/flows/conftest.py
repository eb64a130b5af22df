"""Fixtures for the flow tests (helpers live in flowkit.py; importing it sets a private PREFECT_HOME)."""

from __future__ import annotations

import pytest

import flowkit  # noqa: F401  (sets the hermetic environment before anything imports Prefect)


@pytest.fixture(scope="session")
def prefect_harness():
    """An in-process temporary Prefect API for flows called directly (ephemeral mode)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
