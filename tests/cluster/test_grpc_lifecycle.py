"""The gRPC server's life beyond one request: `goodspec serve` draining on SIGTERM, and workers
and engines that die under it (requests fail clearly, health follows, engines are replaced)."""

from __future__ import annotations

import time

import grpc
import pytest

from goodspec.client import GenerationClient
from goodspec.v1 import generation_pb2 as pb
from tests.cluster.conftest import free_port
from tests.cluster.test_group import make_group
from tests.cluster.test_grpc import ServerThread, _wait_for, wait_idle


def wait_serving(client, proc, timeout: float = 240) -> None:
    """Until the `goodspec serve` process `proc` says SERVING; fails with its output if it dies."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.health() == "SERVING":
                return
        except grpc.RpcError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.5)


def _non_loopback_listeners(pid: int) -> list[str]:
    import ipaddress

    import psutil

    procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    out = []
    for p in procs:
        try:
            for c in p.net_connections(kind="inet"):
                ip = ipaddress.ip_address(c.laddr.ip)
                if c.status == psutil.CONN_LISTEN and not (ip.is_loopback or (
                        ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)):
                    out.append(f"{p.name()} {c.laddr.ip}:{c.laddr.port}")
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.parametrize("signal_to", ["server", "process group"])
def test_goodspec_serve_drains_on_sigterm(tmp_path, signal_to):
    """As an operator runs it: `goodspec serve` in its own process; SIGTERM, to the server or to
    its whole process group, lets the in-flight request finish, refuses new ones, and the
    process exits 0. A loopback-only serve (and its embedded Ray) listens on loopback only, and
    a second serve on the same port fails to bind, at once."""
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    cmd = [sys.executable, "-m", "goodspec.cli", "serve", "--model", "tiny", "--port", str(port), "--num-cpus", "3",
           "--device", "cpu", "--threads", "1", "--drain-grace-s", "60"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        with GenerationClient(address) as c:
            wait_serving(c, proc)
            if signal_to == "process group":
                assert _non_loopback_listeners(proc.pid) == []
                t0 = time.monotonic()
                second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                assert second.returncode == 2 and f"cannot bind 127.0.0.1:{port}" in second.stderr
                assert time.monotonic() - t0 < 30  # refused before loading any model
            stream = c.generate("Tell me about the sea.", max_new_tokens=120, ignore_eos=True)
            first = next(stream)
            if signal_to == "server":
                os.kill(proc.pid, signal.SIGTERM)
            else:
                os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(grpc.RpcError) as err:  # draining: no new requests
                c.complete("Hello", max_new_tokens=2, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            rest = list(stream)  # the in-flight request still finishes
            assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
            assert len(first.token_ids) + sum(len(m.token_ids) for m in rest) == 120
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_worker_ray_will_not_restart_fails_its_requests_and_health_follows_the_engines(ray_session):
    """max_restarts=0 and two replicas: killing replica 0's target fails the request it was
    serving (UNAVAILABLE, saying why) while replica 1 keeps serving and health stays SERVING;
    once replica 1's target is gone too, health goes NOT_SERVING and new requests are refused
    at once, clearly."""
    import os
    import signal

    import ray

    g = make_group(cluster__replicas=2, cluster__max_restarts=0, cluster__replace_broken_engines=False)
    s = ServerThread(g, health_check_s=0.3)
    try:
        with GenerationClient(s.address) as c:
            pids = [ray.get(e.actor.worker_pids.remote(), timeout=60)["target"] for e in g.engines]
            stream = c.generate("Tell me a long story about the sea.", max_new_tokens=400, ignore_eos=True)
            next(stream)
            assert [e.running for e in c.server_stats().engines] == [1, 0]  # idle router: replica 0
            t0 = time.monotonic()
            os.kill(pids[0], signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as err:
                for _ in stream:
                    pass
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "target" in err.value.details() and "will not restart" in err.value.details()
            assert time.monotonic() - t0 < 20, "a worker that is gone for good must not be waited on for long"
            assert "gone for good" in c.server_stats().engines[0].unhealthy
            time.sleep(1.0)  # a health check has run: the router knows
            assert c.health() == "SERVING"
            for _ in range(3):  # all to replica 1, all served
                assert len(c.complete("Hello", max_new_tokens=4, ignore_eos=True).token_ids) == 4

            stream = c.generate("Tell me a long story about the sea.", max_new_tokens=400, ignore_eos=True)
            next(stream)
            os.kill(pids[1], signal.SIGKILL)
            with pytest.raises(grpc.RpcError):
                for _ in stream:
                    pass
            assert _wait_for(lambda: c.health() == "NOT_SERVING", 10)
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                c.complete("Hello", max_new_tokens=4)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no healthy engine" in err.value.details()
            assert time.monotonic() - t0 < 2
            assert all(e.unhealthy for e in c.server_stats().engines)
    finally:
        s.stop()
        g.shutdown()


def test_an_engine_that_can_no_longer_serve_is_replaced(ray_session, sharegpt_prompts, greedy_reference):
    """The default: an engine that can no longer serve (a worker Ray gave up on; a dead scheduler
    actor, which holds every request's state and so is never restarted) fails its streams with
    UNAVAILABLE, and the server puts a fresh engine (new actors, new placement group) in its
    place and serves again, with unchanged output. One group, both deaths in turn: the engine
    that replaced the first is the one that loses its scheduler actor, so a replacement is
    itself replaceable (and one group start, ~20 s here, is saved)."""
    import os
    import signal

    import ray

    g = make_group(cluster__max_restarts=0)
    s = ServerThread(g, health_check_s=0.3)
    try:
        with GenerationClient(s.address) as c:
            for what_dies in ("target worker", "scheduler actor"):
                old_actor = g.engines[0].actor
                old_pid = ray.get(old_actor.worker_pids.remote(), timeout=60)["target"]
                stream = c.generate("Tell me a long story about the sea.", max_new_tokens=400, ignore_eos=True)
                next(stream)
                t0 = time.monotonic()
                if what_dies == "target worker":
                    os.kill(old_pid, signal.SIGKILL)
                else:
                    ray.kill(old_actor, no_restart=True)
                with pytest.raises(grpc.RpcError) as err:
                    for _ in stream:
                        pass
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, what_dies
                assert what_dies != "scheduler actor" or "scheduler actor died" in err.value.details()
                assert time.monotonic() - t0 < 20, what_dies
                assert _wait_for(lambda: c.health() == "SERVING" and g.engines[0].actor is not old_actor
                                 and not c.server_stats().engines[0].unhealthy, 180), what_dies
                assert ray.get(g.engines[0].actor.worker_pids.remote(), timeout=60)["target"] != old_pid
                prompt = sharegpt_prompts[2]
                n, want = greedy_reference[prompt]
                assert list(c.complete(prompt, max_new_tokens=n, policy="fixed:3").token_ids) == want, what_dies
                assert wait_idle(c)
    finally:
        s.stop()
        g.shutdown()
