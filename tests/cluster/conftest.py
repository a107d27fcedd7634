"""Fixtures shared by the cluster tests."""

from __future__ import annotations

import socket

import pytest


def free_port() -> int:
    """A loopback port free at the time of the call (bound and released: another process may
    take it before the caller binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def group(ray_session):
    """An engine group on the tiny pair, shared by the cluster test modules (each starts its own
    servers on it; starting a group is ~11 s of this suite's time on 2 cores, mostly the worker
    processes' imports). Tests that kill or starve an engine make their own group."""
    from tests.cluster.test_group import make_group

    g = make_group(engine__target_kv_tokens=16384, engine__draft_kv_tokens=16384)
    yield g
    g.shutdown()
