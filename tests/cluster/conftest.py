"""Fixtures shared by the cluster tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def group(ray_session):
    """An engine group on the tiny pair, shared by the cluster test modules (each starts its own
    servers on it; starting a group is ~11 s of this suite's time on 2 cores, mostly the worker
    processes' imports). Tests that kill or starve an engine make their own group."""
    from tests.cluster.test_group import make_group

    g = make_group(engine__target_kv_tokens=16384, engine__draft_kv_tokens=16384)
    yield g
    g.shutdown()
