"""goodspec's gRPC front door as a Ray Serve application: the server runs inside the Ray cluster
(no Ray Client on the serving path), and KubeRay's RayService can upgrade it without downtime.

    serve run goodspec.cluster.serve_app:build_app --config-file goodspec-serve.yaml
    # or, under KubeRay, a RayService whose serveConfigV2 imports build_app (deploy/kuberay)

Serve runs the replica: its placement (the manifest pins it to the head pod, whose Service
port 50051 clients use), health checks, restarts, and RayService's blue-green upgrade, which
moves the head Service to a new cluster only once this application is healthy there. Serve's
own proxies do not carry the requests: its gRPC proxy serves user servicers without server
reflection, gRPC health, bearer auth on our terms, per-connection admission limits or our
streaming write timeout, all of which `GoodspecServer` has. So the replica starts the engines
(its child actors: they go with it) and listens with goodspec's own gRPC server.
"""

from __future__ import annotations

import asyncio
import logging

from ray import serve

from goodspec.cluster.grpc_server import GoodspecServer
from goodspec.config import GoodspecConfig, config_from_tree

log = logging.getLogger("goodspec.server")


@serve.deployment(
    num_replicas=1,  # one front door owns the engines it starts
    max_ongoing_requests=8,  # Serve's own calls (address, health); requests arrive over gRPC
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=60,  # at least server.drain_grace_s
    ray_actor_options={"num_cpus": 1},  # tokenising and validation; the engines have their own
)
class FrontDoor:
    async def __init__(self, config: dict) -> None:
        self.config: GoodspecConfig = config_from_tree(config)
        from goodspec.cluster.group import EngineGroup

        # Placement and model loading block for a while; the replica's event loop stays free.
        self.group = await asyncio.to_thread(EngineGroup, self.config)
        self.server = GoodspecServer(self.group, self.config.server)
        await self.server.start()
        log.warning("goodspec serving on %s:%d inside the Ray cluster", self.config.server.host, self.server.port)

    async def address(self) -> str:
        return f"{self.config.server.host}:{self.server.port}"

    async def check_health(self) -> None:
        """Serve restarts a replica whose check raises; RayService will not promote a cluster
        whose application is not healthy."""
        if self.server.servicer.draining:
            raise RuntimeError("draining")
        if not any(e.unhealthy is None for e in self.group.engines):
            raise RuntimeError("no engine can serve: " + "; ".join(
                f"engine {e.index}: {e.unhealthy}" for e in self.group.engines))

    async def __del__(self) -> None:
        """Serve is shutting the replica down (an upgrade moved traffic away, or a scale-down):
        stop admitting, let requests in flight finish, then stop the engines."""
        await self.server.drain()
        await asyncio.to_thread(self.group.shutdown)


def build_app(args: dict):
    """The application for `serve run` / serveConfigV2: `args` is goodspec's config tree (the
    keys `goodspec serve --config` reads)."""
    config_from_tree(args)  # fail at deploy time, naming the key, not in a replica restart loop
    return FrontDoor.bind(args)
