"""`goodspec serve`'s hold on its port, from the check before Ray starts until gRPC binds it."""

from __future__ import annotations

import socket
from concurrent import futures

import grpc
import pytest

from goodspec.cluster.grpc_server import server_options
from goodspec.cluster.lifecycle import hold_port
from goodspec.config import ServerConfig
from tests.cluster.conftest import free_port


def test_a_held_port_is_refused_to_others_and_bound_by_the_grpc_server():
    port = free_port()
    held = hold_port("127.0.0.1", port)
    try:
        with socket.socket() as other, pytest.raises(OSError):  # what a Ray process would do
            other.bind(("127.0.0.1", port))
        # gRPC, with goodspec's own options (SO_REUSEPORT off), binds it while it is held.
        server = grpc.server(futures.ThreadPoolExecutor(1), options=server_options(ServerConfig(port=port)))
        assert server.add_insecure_port(f"127.0.0.1:{port}") == port
        server.start()
    finally:
        held.close()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
        with pytest.raises(RuntimeError, match=f"cannot bind 127.0.0.1:{port}"):  # a second serve
            hold_port("127.0.0.1", port)
    finally:
        server.stop(0)


def test_port_zero_holds_nothing():
    assert hold_port("127.0.0.1", 0) is None
