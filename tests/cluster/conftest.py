"""Fixtures shared by the cluster tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def group(ray_session):
    """An engine group on the tiny pair, one per test module (tests may start servers on it)."""
    from tests.cluster.test_group import make_group

    g = make_group(engine__target_kv_tokens=16384, engine__draft_kv_tokens=16384)
    yield g
    g.shutdown()
