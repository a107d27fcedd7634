"""The front door inside the Ray cluster: goodspec's gRPC server as the Ray Serve application
that deploy/kuberay/rayservice.yaml deploys (its config, on the CPU and loopback), on the test
session's Ray."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import yaml

from goodspec.client import GenerationClient

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "kuberay" / "rayservice.yaml"


def deploy_args() -> dict:
    (service,) = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    args = app["args"]
    args["engine"].update(model="tiny", device="cpu", dtype="float32", policy="fixed:3", threads=1)
    args["cluster"].update(replicas=1, worker_gpus=0.0, call_timeout_s=60.0)
    args["server"].update(host="127.0.0.1", port=0, metrics_port=None, health_check_s=1.0)
    return args


@pytest.fixture(scope="module")
def front_door(ray_session):
    from ray import serve

    from goodspec.cluster.serve_app import build_app

    serve.start(proxy_location="Disabled")  # nothing of Serve's own proxies is used
    handle = serve.run(build_app(deploy_args()), name="goodspec", route_prefix=None)
    try:
        yield handle
    finally:
        serve.shutdown()


def test_a_bad_config_is_refused_at_deploy_time_naming_the_key():
    from goodspec.cluster.serve_app import build_app

    with pytest.raises(ValueError, match="polcy"):
        build_app({"engine": {"polcy": "goodput"}})


def test_the_serve_replica_serves_grpc_with_health_and_streams(front_door):
    address = front_door.address.remote().result(timeout_s=60)
    with GenerationClient(address) as client:
        assert client.health(timeout=10) == "SERVING"
        streamed = list(client.generate("The sea is", max_new_tokens=8, ignore_eos=True))
        unary = client.complete("The sea is", max_new_tokens=8, ignore_eos=True)
        assert [t for m in streamed for t in m.token_ids] == list(unary.token_ids)
        assert len(unary.token_ids) == 8
        with pytest.raises(grpc.RpcError) as err:
            client.complete("Hello", max_new_tokens=2, policy="sometimes")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stats = client.server_stats()
        assert stats.engines[0].num_steps > 0 and not stats.engines[0].unhealthy
    front_door.check_health.remote().result(timeout_s=30)  # what Serve and RayService ask
