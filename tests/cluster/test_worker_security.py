"""A real worker actor process under attack from the network: the crafted pickle frame on every
port it listens on runs no code, and a 1 GiB frame announced to it costs it no memory."""

from __future__ import annotations

import pickle
import socket
import struct
import time

import psutil
import pytest

from goodspec.cluster.channel import new_token
from goodspec.config import DEFAULT_TARGET
from goodspec.workers.model_runner import RunnerConfig
from tests.cluster.test_channel import _Exploit


@pytest.fixture(scope="module")
def worker(ray_session):
    import ray

    from goodspec.cluster.worker_actor import WorkerActor

    # host=None: the channel on the node's routable address, the worst case (an engine whose
    # actors may sit on different nodes).
    actor = ray.remote(WorkerActor).options(num_cpus=1).remote(
        "target", RunnerConfig(DEFAULT_TARGET, "cpu", "float32", 1024, 16, 1), new_token(), None)
    info = ray.get(actor.info.remote(), timeout=120)
    yield actor, info
    ray.kill(actor)


def _listening_ports(pid: int) -> list[tuple[str, int]]:
    out = []
    for c in psutil.Process(pid).net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN:
            host = c.laddr.ip if c.laddr.ip not in ("0.0.0.0", "::") else "127.0.0.1"
            out.append((host, c.laddr.port))
    return out


def test_the_crafted_pickle_frame_runs_no_code_on_any_port_of_the_worker(worker, tmp_path):
    import ray

    actor, info = worker
    ports = _listening_ports(info.pid)
    assert tuple(info.channel) in ports or any(p == info.channel[1] for _, p in ports)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(str(marker)))
    for address in ports:
        for prefix in (struct.pack("!Q", len(payload)), struct.pack("!I", len(payload))):
            try:
                with socket.create_connection(address, timeout=5) as s:
                    s.sendall(prefix + payload)
                    s.settimeout(2.5)
                    try:
                        s.recv(1)
                    except OSError:
                        pass
            except OSError:
                pass  # refused or reset: nothing ran either
    time.sleep(0.5)
    assert not marker.exists(), f"code ran in the worker through one of {ports}"
    assert ray.get(actor.info.remote(), timeout=30).pid == info.pid  # still up, same process


def test_a_1gib_frame_announced_to_the_worker_does_not_move_its_memory(worker):
    _, info = worker
    proc = psutil.Process(info.pid)
    before = proc.memory_info().rss
    socks = []
    for _ in range(4):
        s = socket.create_connection(tuple(info.channel), timeout=5)
        s.sendall(struct.pack("!Q", 1 << 30) + b"\x00" * 64)
        socks.append(s)
    time.sleep(1.0)
    grown = proc.memory_info().rss - before
    for s in socks:
        s.close()
    assert grown < 64 << 20, f"the worker grew by {grown >> 20} MiB"
