"""The scheduler-to-worker socket channel: replies, worker errors, ordering, auth, a dead peer."""

from __future__ import annotations

import pytest

from goodspec.cluster.channel import ChannelClient, ChannelClosed, ChannelServer
from goodspec.workers.kv_cache import UnknownSequenceError


class _Worker:
    def __init__(self) -> None:
        self.freed: list[str] = []

    def add(self, a: int, b: int) -> int:
        return a + b

    def fail(self, seq: str) -> None:
        raise UnknownSequenceError(f"no cache for {seq!r}")

    def free(self, ids: list[str]) -> None:
        self.freed += ids

    def freed_so_far(self) -> list[str]:
        return list(self.freed)


@pytest.fixture
def server():
    w = _Worker()
    methods = {m: getattr(w, m) for m in ("add", "fail", "free", "freed_so_far")}
    return ChannelServer(methods, token="secret")


def test_calls_errors_and_fire_and_forget_ordering(server):
    c = ChannelClient(server.address, "secret", timeout_s=5)
    assert c.call("add", 2, 3) == 5
    with pytest.raises(UnknownSequenceError, match="no cache"):
        c.call("fail", "r1")
    c.send("free", ["a", "b"])  # no reply, but done before the next call runs
    assert c.call("freed_so_far") == ["a", "b"]
    with pytest.raises(KeyError):
        c.call("no_such_method")
    assert c.call("add", 1, 1) == 2  # the channel survives worker errors
    c.close()


def test_wrong_token_is_disconnected(server):
    c = ChannelClient(server.address, "wrong", timeout_s=5)
    with pytest.raises((ChannelClosed, ConnectionError, OSError)):
        c.call("add", 1, 2)


def test_a_reconnecting_caller_is_served_while_the_old_connection_lingers(server):
    a = ChannelClient(server.address, "secret", timeout_s=5)
    b = ChannelClient(server.address, "secret", timeout_s=5)
    assert a.call("add", 1, 2) == 3 and b.call("add", 3, 4) == 7
