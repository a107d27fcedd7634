"""The gRPC front door against careless and hostile clients: every input bounded, nothing a client
sends can freeze, starve or outlive the others, and the server stays up (real server, real Ray)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from goodspec.client import GenerationClient, build_request
from goodspec.cluster.grpc_server import server_options
from goodspec.cluster.metrics import ServerMetrics
from goodspec.cluster.servicer import GenerationServicer
from goodspec.config import ServerConfig
from goodspec.v1 import generation_pb2 as pb
from goodspec.v1 import generation_pb2_grpc as pb_grpc
from tests.cluster.test_grpc import ServerThread, wait_idle


@pytest.fixture(scope="module")
def server(group):
    s = ServerThread(group, max_requests_per_connection=2, metrics_port=0, metrics_auth=True,
                     auth_token="tok3n")
    yield s
    s.stop()


@pytest.fixture()
def client(server):
    with GenerationClient(server.address, token="tok3n") as c:
        yield c


def _invalid(call, field: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert field in err.value.details()


@pytest.mark.parametrize("kwargs, field", [
    (dict(request_id="x" * 129), "request_id"),
    (dict(request_id="bad\nid"), "request_id"),
    (dict(stop=["s"] * 17), "max_stop_strings"),
    (dict(stop=["x" * 257]), "max_stop_chars"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(policy="fixed:" + "0" * 40 + "3"), "speculation.policy"),
    (dict(policy="fixed:65"), "speculation.policy"),
])
def test_oversized_and_malformed_fields_are_invalid_argument(client, kwargs, field):
    _invalid(lambda: client.complete("Hello", max_new_tokens=2, **kwargs), field)
    assert len(client.complete("Hello", max_new_tokens=2).token_ids) == 2


def test_a_prompt_over_max_prompt_bytes_is_refused_before_tokenising(client, group, monkeypatch):
    calls = []
    monkeypatch.setattr(group.codec, "encode", lambda text: calls.append(len(text)) or [1])
    _invalid(lambda: client.complete("a" * 262145, max_new_tokens=2), "max_prompt_bytes")
    assert calls == []


def test_an_underflowing_temperature_is_greedy(client):
    greedy = client.complete("The sea is", max_new_tokens=12, ignore_eos=True)
    tiny = client.complete("The sea is", max_new_tokens=12, ignore_eos=True, temperature=1e-38, seed=1)
    assert list(tiny.token_ids) == list(greedy.token_ids)


def test_a_malformed_request_body_is_invalid_argument(server):
    with grpc.insecure_channel(server.address) as ch:
        raw = ch.unary_unary("/goodspec.v1.Generation/Complete", request_serializer=None,
                             response_deserializer=pb.GenerateResponse.FromString)
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff\xff", metadata=[("authorization", "Bearer tok3n")], timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "GenerateRequest" in err.value.details()


def test_model_info_names_models_without_server_paths(client):
    info = client.model_info()
    assert info.target_model and "/" not in info.target_model and "/" not in info.draft_model


def test_one_connection_cannot_take_every_slot(server):
    """Streams opened and never read hold at most max_requests_per_connection slots; another
    connection is still served."""
    own = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own, not a shared one
    meta = [("authorization", "Bearer tok3n")]
    with grpc.insecure_channel(server.address, own) as greedy_ch, grpc.insecure_channel(server.address, own) as other_ch:
        stub = pb_grpc.GenerationStub(greedy_ch)
        long = build_request("Count to a thousand.", max_new_tokens=400, ignore_eos=True)
        hogs = [stub.Generate(long, metadata=meta) for _ in range(2)]
        for h in hogs:
            next(h)  # admitted; never read again
        with pytest.raises(grpc.RpcError) as err:
            stub.Complete(build_request("Hello", max_new_tokens=2), metadata=meta, timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_requests_per_connection" in err.value.details()
        other = pb_grpc.GenerationStub(other_ch).Complete(build_request("Hello", max_new_tokens=2),
                                                           metadata=meta, timeout=60)
        assert len(other.token_ids) == 2
        for h in hogs:
            h.cancel()


def test_a_retry_right_after_a_cancel_with_the_same_request_id_is_accepted(client):
    call = client.generate("Tell me a long story about the sea.", max_new_tokens=300, ignore_eos=True,
                           request_id="retry-me")
    next(call)
    with pytest.raises(grpc.RpcError) as err:  # the original is still in flight
        client.complete("Hello", max_new_tokens=2, request_id="retry-me")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    call.cancel()
    deadline = time.monotonic() + 10
    while True:  # ALREADY_EXISTS is retryable: at most until the server has seen the cancel
        try:
            done = client.complete("Hello", max_new_tokens=2, request_id="retry-me")
            break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.ALREADY_EXISTS and time.monotonic() < deadline
            time.sleep(0.05)
    assert done.request_id == "retry-me" and len(done.token_ids) == 2
    assert wait_idle(client)


def test_metrics_require_the_token_when_asked_to(server):
    from urllib.error import HTTPError
    from urllib.request import Request, urlopen

    url = f"http://{server.server.metrics_host}:{server.server.metrics_port}/metrics"
    with pytest.raises(HTTPError) as err:
        urlopen(url, timeout=10)
    assert err.value.code == 401
    ok = urlopen(Request(url, headers={"Authorization": "Bearer tok3n"}), timeout=10)
    assert b"goodspec_requests_total" in ok.read()


def test_the_token_can_come_from_a_file(group, tmp_path):
    path = tmp_path / "token"
    path.write_text("from-a-file\n")
    s = ServerThread(group, auth_token_file=str(path))
    try:
        with GenerationClient(s.address, token="from-a-file") as ok:
            assert len(ok.complete("Hello", max_new_tokens=2).token_ids) == 2
        with GenerationClient(s.address) as anon, pytest.raises(grpc.RpcError) as err:
            anon.complete("Hello", max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        s.stop()


def test_a_port_already_served_cannot_be_bound_twice():
    async def bind_twice():
        first = grpc.aio.server(options=server_options(ServerConfig()))
        port = first.add_insecure_port("127.0.0.1:0")
        second = grpc.aio.server(options=server_options(ServerConfig()))
        try:
            got = second.add_insecure_port(f"127.0.0.1:{port}")
        except RuntimeError:
            got = 0
        await first.start()
        await first.stop(0)
        return got

    assert asyncio.run(bind_twice()) == 0


class _StuckContext:
    """A client whose HTTP/2 window is full: every write waits forever."""

    def __init__(self) -> None:
        self.aborted: tuple | None = None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    async def write(self, message) -> None:
        await asyncio.Event().wait()

    async def abort(self, code, details):
        self.aborted = (code, details)
        raise grpc.aio.AbortError()


def test_a_stream_that_is_never_read_is_ended_and_frees_its_slot(group):
    async def run():
        config = ServerConfig(stream_write_timeout_s=0.5)
        servicer = GenerationServicer(group, config, ServerMetrics(group.stats))
        ctx = _StuckContext()
        req = build_request("Tell me a long story.", max_new_tokens=200, ignore_eos=True)
        with pytest.raises(grpc.aio.AbortError):
            await asyncio.wait_for(servicer.Generate(req, ctx), 60)
        return ctx.aborted, servicer.in_flight

    (code, details), in_flight = asyncio.run(run())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "stream_write_timeout_s" in details
    assert in_flight == 0


def test_tokenising_a_large_prompt_does_not_stall_the_event_loop(group, monkeypatch):
    def slow_encode(text: str) -> list[int]:
        time.sleep(1.0)  # as a multi-megabyte prompt would
        return [1, 2, 3]

    async def run():
        servicer = GenerationServicer(group, ServerConfig(), ServerMetrics(group.stats))
        monkeypatch.setattr(group.codec, "encode", slow_encode)
        lags = []

        async def ticker():
            while True:
                t = time.perf_counter()
                await asyncio.sleep(0.01)
                lags.append(time.perf_counter() - t)

        tick = asyncio.ensure_future(ticker())
        await servicer._admit(build_request("big prompt", max_new_tokens=2))
        tick.cancel()
        return max(lags)

    assert asyncio.run(run()) < 0.3
