"""The gRPC front door: a real grpc.aio server on loopback over the real Ray runtime."""

from __future__ import annotations

import datetime
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from goodspec.client import GenerationClient
from goodspec.cluster.grpc_server import BackgroundServer
from goodspec.config import ServerConfig
from goodspec.v1 import generation_pb2 as pb


def ServerThread(group, warm: bool = True, **config) -> BackgroundServer:
    return BackgroundServer(group, ServerConfig(port=0, **config), warm=warm)


@pytest.fixture(scope="module")
def server(group):
    s = ServerThread(group)
    yield s
    s.stop()


@pytest.fixture()
def client(server):
    with GenerationClient(server.address) as c:
        yield c


def wait_idle(client, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        e = client.server_stats().engines[0]
        if e.running == 0 and e.waiting == 0 and e.target_kv_blocks_used == 0 and e.draft_kv_blocks_used == 0:
            return True
        time.sleep(0.05)
    return False


def test_streaming_and_unary_match_target_only_greedy(client, sharegpt_prompts, greedy_reference):
    for p in sharegpt_prompts[:6]:
        n, want = greedy_reference[p]
        unary = client.complete(p, max_new_tokens=n, policy="fixed:3")
        chunks = list(client.generate(p, max_new_tokens=n))
        assert list(unary.token_ids) == want
        assert [t for c in chunks for t in c.token_ids] == want
        assert "".join(c.text for c in chunks) == unary.text
        final = chunks[-1]
        assert final.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS)
        assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
        assert final.usage.completion_tokens == len(want) and final.usage.prompt_tokens > 0
        assert final.usage.draft_tokens_accepted <= final.usage.draft_tokens_proposed


def test_32_concurrent_streams(server, sharegpt_prompts, greedy_reference):
    prompts = sharegpt_prompts[:32]

    def one(p):
        with GenerationClient(server.address) as c:
            return [t for m in c.generate(p, max_new_tokens=greedy_reference[p][0]) for t in m.token_ids]

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, prompts))
    assert got == [greedy_reference[p][1] for p in prompts]


@pytest.mark.parametrize("kwargs, field", [
    (dict(prompt=""), "prompt"),
    (dict(prompt="word " * 2000), "context is 1024"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(policy="sometimes"), "speculation.policy"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=10**9), "max_new_tokens"),
])
def test_bad_input_is_invalid_argument_naming_the_field_and_server_still_serves(client, kwargs, field):
    prompt = kwargs.pop("prompt", "Hello")
    kw = dict(max_new_tokens=4)
    kw.update(kwargs)
    for call in (lambda: client.complete(prompt, **kw), lambda: list(client.generate(prompt, **kw))):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.value.details()
    assert client.health() == "SERVING"
    assert len(client.complete("Hello", max_new_tokens=3).token_ids) == 3


def test_client_cancel_frees_the_request_cache_at_once(client):
    before = client.server_stats().requests_cancelled
    call = client.generate("Tell me a long story about the sea.", max_new_tokens=500, ignore_eos=True)
    for _ in range(3):
        next(call)
    assert client.server_stats().engines[0].target_kv_blocks_used > 0
    call.cancel()
    assert wait_idle(client), client.server_stats()
    assert client.server_stats().requests_cancelled > before


def test_deadline_aborts_the_request_and_frees_its_cache(client):
    before = client.server_stats().requests_cancelled
    with pytest.raises(grpc.RpcError) as err:
        client.complete("Write a very long essay.", max_new_tokens=800, ignore_eos=True, timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_idle(client), client.server_stats()
    assert client.server_stats().requests_cancelled > before


def test_overload_is_resource_exhausted(group):
    s = ServerThread(group, max_queued_requests=2)
    try:
        with GenerationClient(s.address) as c:
            long = [c.generate("Count to a thousand.", max_new_tokens=300, ignore_eos=True) for _ in range(2)]
            for call in long:
                next(call)  # both admitted and running
            with pytest.raises(grpc.RpcError) as err:
                c.complete("Hello", max_new_tokens=2)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_queued_requests=2" in err.value.details()
            for call in long:
                call.cancel()
    finally:
        s.stop()


def test_health_goes_not_serving_serving_then_draining_refuses_new_requests(group):
    s = ServerThread(group, warm=False)
    try:
        with GenerationClient(s.address) as c:
            assert c.health() == "NOT_SERVING"
            s.call(s.server.warm_up())
            assert c.health() == "SERVING" and c.health("goodspec.v1.Generation") == "SERVING"
            s.call(s.server.begin_drain())
            assert c.health() == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as err:
                c.complete("Hello", max_new_tokens=2)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        s.stop()


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.address) as ch:
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
    assert {"goodspec.v1.Generation", "grpc.health.v1.Health"} <= services


def test_model_info(client):
    info = client.model_info()
    assert info.max_context_length == 1024 and info.vocab_size == 4096
    assert info.speculation_policy == "fixed:3" and info.target_model.endswith("target")


def test_bearer_token_auth_on_and_health_exempt(group):
    s = ServerThread(group, auth_token="s3cret")
    try:
        with GenerationClient(s.address) as anon:
            assert anon.health() == "SERVING"
            with pytest.raises(grpc.RpcError) as err:
                anon.complete("Hello", max_new_tokens=2)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                list(anon.generate("Hello", max_new_tokens=2))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with GenerationClient(s.address, token="wrong") as bad:
            with pytest.raises(grpc.RpcError):
                bad.complete("Hello", max_new_tokens=2)
        with GenerationClient(s.address, token="s3cret") as ok:
            assert len(ok.complete("Hello", max_new_tokens=2).token_ids) == 2
    finally:
        s.stop()


def _self_signed(tmp_path, name: str, ca=None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_key, issuer = (key, subject) if ca is None else ca
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True)
            .sign(issuer_key, hashes.SHA256()))
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path), (key, subject)


def test_tls_and_mutual_tls_round_trip(group, tmp_path):
    ca_cert, _, ca = _self_signed(tmp_path, "goodspec-test-ca")
    srv_cert, srv_key, _ = _self_signed(tmp_path, "localhost", ca=ca)
    cli_cert, cli_key, _ = _self_signed(tmp_path, "client", ca=ca)
    s = ServerThread(group, tls_cert=srv_cert, tls_key=srv_key, tls_client_ca=ca_cert)
    try:
        address = f"localhost:{s.server.port}"
        with GenerationClient(address, tls_ca=ca_cert, tls_cert=cli_cert, tls_key=cli_key) as c:
            assert len(c.complete("Hello", max_new_tokens=3).token_ids) == 3
        with GenerationClient(address, tls_ca=ca_cert) as no_client_cert:
            with pytest.raises(grpc.RpcError) as err:
                no_client_cert.complete("Hello", max_new_tokens=3, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with GenerationClient(address) as plaintext:
            with pytest.raises(grpc.RpcError):
                plaintext.complete("Hello", max_new_tokens=3, timeout=10)
    finally:
        s.stop()


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_prometheus_metrics_follow_requests_and_engines(group):
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    s = ServerThread(group, metrics_port=0)

    def scrape() -> dict:
        text = urlopen(f"http://127.0.0.1:{s.server.metrics_port}/metrics", timeout=10).read().decode()
        return {(x.name, tuple(sorted(x.labels.items()))): x.value
                for family in text_string_to_metric_families(text) for x in family.samples}

    try:
        before = scrape()

        def grew(name, **labels):
            key = (name, tuple(sorted(labels.items())))
            return scrape().get(key, 0) - before.get(key, 0)

        with GenerationClient(s.address) as c:
            assert len(c.complete("Hello there", max_new_tokens=7, ignore_eos=True).token_ids) == 7
            with pytest.raises(grpc.RpcError):
                c.complete("", max_new_tokens=3)
            call = c.generate("Tell me a long story about the sea.", max_new_tokens=500, ignore_eos=True)
            next(call)
            call.cancel()
            assert wait_idle(c)
        assert _wait_for(lambda: grew("goodspec_requests_total", outcome="cancelled") == 1, 10)
        assert grew("goodspec_requests_total", outcome="finished") == 1
        assert grew("goodspec_requests_total", outcome="rejected") == 1
        assert grew("goodspec_requests_total", outcome="failed") == 0
        assert grew("goodspec_generated_tokens_total") >= 7 + 1
        assert grew("goodspec_time_to_first_token_seconds_count") == 2
        assert grew("goodspec_request_latency_seconds_count") == 1
        after = scrape()
        assert after[("goodspec_requests_in_flight", ())] == 0
        assert after[("goodspec_engine_healthy", (("replica", "0"),))] == 1
        assert after[("goodspec_engine_kv_blocks_used", (("replica", "0"), ("worker", "target")))] == 0
        assert 0 < after[("goodspec_engine_acceptance_rate", (("replica", "0"),))] <= 1
    finally:
        s.stop()


def test_server_stats_report_goodputs_step_time_error(client, group, sharegpt_prompts):
    """GetServerStats carries the goodput policies' step-time MAPE (what `goodspec bench`
    reports per goodput run): the engine's own figure, once goodput has predicted steps."""
    for p in sharegpt_prompts[:4]:
        client.complete(p, max_new_tokens=48, policy="goodput", ignore_eos=True)
    assert wait_idle(client)
    own = group.stats()[0].step_time_mape
    assert own is not None and 0 < own < 1
    assert abs(client.server_stats().engines[0].step_time_mape - own) < 1e-12
