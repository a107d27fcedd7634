"""The gRPC front door: an asyncio server over an EngineGroup, with health, reflection,
bearer-token auth, TLS/mTLS, a bounded admission queue and SIGTERM draining."""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import socket
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from goodspec.cluster.group import EngineGroup
from goodspec.cluster.metrics import ServerMetrics
from goodspec.cluster.servicer import SERVICE, GenerationServicer, generation_handlers
from goodspec.config import ServerConfig
from goodspec.workers.sampling import SamplingParams

log = logging.getLogger("goodspec.server")
HEALTH_EXEMPT = "/grpc.health.v1.Health/"
REPLACE_BACKOFF_S = 30.0


class BearerAuth(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        if details.method.startswith(HEALTH_EXEMPT):
            return await continuation(details)
        headers = dict(details.invocation_metadata or ())
        got = headers.get("authorization", "")
        got = got.encode() if isinstance(got, str) else bytes(got)
        if hmac.compare_digest(got, self._expected):  # constant time: no timing oracle
            return await continuation(details)
        handler = await continuation(details)
        if handler is not None and handler.response_streaming:
            return self._deny_stream
        return self._deny_unary


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    return [
        # gRPC's default lets a second server share the port (and half the connections, bearer
        # tokens included): a port already served must fail to bind instead.
        ("grpc.so_reuseport", 0),
        # A request is a prompt plus small fields: bodies far over max_prompt_bytes are refused
        # (RESOURCE_EXHAUSTED) before they are parsed; those just over it get INVALID_ARGUMENT.
        ("grpc.max_receive_message_length", 4 * config.max_prompt_bytes + (64 << 10)),
    ]


class GoodspecServer:
    """Owns the grpc.aio server, the servicer and the health state."""

    def __init__(self, group: EngineGroup, config: ServerConfig) -> None:
        self.config = config
        self.group = group
        token = config.bearer_token()
        self.server = grpc.aio.server(interceptors=[BearerAuth(token)] if token else [],
                                      options=server_options(config))
        self.metrics = ServerMetrics(group.stats)
        self.servicer = GenerationServicer(group, config, self.metrics)
        self.server.add_generic_rpc_handlers((generation_handlers(self.servicer),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        address = f"{config.host}:{config.port}"
        if config.tls_cert:
            creds = grpc.ssl_server_credentials(
                [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())],
                root_certificates=Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None,
                require_client_auth=config.tls_client_ca is not None,
            )
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind {address}")
        self.metrics_host = config.metrics_host or config.host
        self.metrics_port = (self.metrics.serve(self.metrics_host, config.metrics_port,
                                                token if config.metrics_auth else None)
                             if config.metrics_port is not None else None)
        self._watcher: asyncio.Task | None = None
        self._replacing: dict[int, asyncio.Task] = {}
        self._replace_failed_at: dict[int, float] = {}

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            await self.health.set(name, status)

    async def start(self) -> None:
        await self.start_listening()
        await self.warm_up()

    async def start_listening(self) -> None:
        """Accept connections; health says NOT_SERVING until warm_up has run."""
        await self._set_health(False)
        await self.server.start()

    async def warm_up(self) -> None:
        # One request on every engine (first forwards allocate memory) before saying SERVING.
        warm = SamplingParams(max_new_tokens=2)
        await asyncio.gather(*(self.group.complete_on(i, "Hello", warm) for i in range(len(self.group.engines))))
        await self._set_health(True)
        if self.config.health_check_s > 0:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_health())

    async def _watch_health(self) -> None:
        """Health follows the engines: NOT_SERVING while none can serve (a worker Ray will not
        restart, a dead scheduler actor), SERVING again once one can; the router skips the
        unhealthy ones meanwhile."""
        serving = True
        while not self.servicer.draining:
            await asyncio.sleep(self.config.health_check_s)
            ok = await self.group.check_health()
            if self.servicer.draining:
                return
            if self.group.config.cluster.replace_broken_engines:
                self._replace_broken()
            if ok != serving:
                why = "; ".join(f"engine {e.index}: {e.unhealthy}" for e in self.group.engines if e.unhealthy)
                log.warning("health: %s%s", "SERVING" if ok else "NOT_SERVING", f" ({why})" if why else "")
                await self._set_health(ok)
                serving = ok

    def _replace_broken(self) -> None:
        """One replacement at a time per engine, and no sooner than REPLACE_BACKOFF_S after a
        failed one (a cluster that cannot place it now may later)."""
        now = asyncio.get_running_loop().time()
        for e in self.group.engines:
            task = self._replacing.get(e.index)
            if not e.broken or (task is not None and not task.done()):
                continue
            if now - self._replace_failed_at.get(e.index, -REPLACE_BACKOFF_S) < REPLACE_BACKOFF_S:
                continue
            log.warning("engine %d cannot serve (%s): starting a fresh one", e.index, e.unhealthy)
            self._replacing[e.index] = asyncio.get_running_loop().create_task(self._replace(e.index))

    async def _replace(self, index: int) -> None:
        try:
            await self.group.replace_engine(index)
            log.warning("engine %d replaced", index)
        except Exception as exc:  # noqa: BLE001 - logged; tried again after the back-off
            self._replace_failed_at[index] = asyncio.get_running_loop().time()
            log.warning("replacing engine %d failed: %s", index, exc)

    async def begin_drain(self) -> None:
        """Stop admitting: new requests get UNAVAILABLE and health says NOT_SERVING."""
        self.servicer.draining = True
        for task in [self._watcher, *self._replacing.values()]:
            if task is not None:
                task.cancel()
        await self._set_health(False)

    async def drain(self) -> None:
        """begin_drain, let in-flight requests finish within the grace period, then stop."""
        await self.begin_drain()
        deadline = asyncio.get_running_loop().time() + self.config.drain_grace_s
        while self.servicer.in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        await self.server.stop(grace=1.0)
        self.metrics.stop()

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def serve_forever(group: EngineGroup, config: ServerConfig,
                        held_port: socket.socket | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain. `held_port`: the socket that kept the port
    while the engines started (lifecycle.hold_port), closed once the server has bound it."""
    srv = GoodspecServer(group, config)
    if held_port is not None:
        held_port.close()
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await srv.start()
    log.warning("goodspec serving on %s:%d", config.host, srv.port)
    print(f"goodspec: serving {SERVICE} on {config.host}:{srv.port}", flush=True)
    if srv.metrics_port is not None:
        print(f"goodspec: Prometheus metrics on http://{config.host}:{srv.metrics_port}/metrics", flush=True)
    await stopping.wait()
    print("goodspec: draining", flush=True)
    await srv.drain()


class BackgroundServer:
    """A GoodspecServer on its own event-loop thread: for `goodspec bench` without --address and
    for tests, which talk to it with the blocking client from the main thread."""

    def __init__(self, group: EngineGroup, config: ServerConfig, warm: bool = True) -> None:
        import threading

        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="goodspec-grpc", daemon=True).start()
        self.server: GoodspecServer = self.call(self._make(group, config))
        self.call(self.server.start_listening())
        if warm:
            self.call(self.server.warm_up())
        self.address = f"127.0.0.1:{self.server.port}"

    @staticmethod
    async def _make(group, config):  # the aio server must be created on its loop
        return GoodspecServer(group, config)

    def call(self, coro, timeout: float = 600):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.call(self.server.begin_drain())
        self.call(self.server.server.stop(grace=0))
        self.server.metrics.stop()
        # What asyncio.run does before it closes a loop: without it the engines' output streams
        # read on this loop (goodspec.cluster.output_stream) stayed open on their scheduler
        # actors, and the group kept a stream per stopped server (seen with one group shared by
        # several servers in turn).
        self.call(self._cancel_the_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)

    @staticmethod
    async def _cancel_the_rest() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
