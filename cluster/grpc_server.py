"""The gRPC front door: an asyncio server over an EngineGroup, with health, reflection,
bearer-token auth, TLS/mTLS, a bounded admission queue and SIGTERM draining."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import time
import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from goodspec.cluster.api import (
    Draining, DuplicateRequest, EngineFailed, GenerateInput, QueueFull, status_of, to_response, validate,
)
from goodspec.cluster.group import EngineGroup
from goodspec.cluster.metrics import ServerMetrics
from goodspec.config import ServerConfig
from goodspec.v1 import generation_pb2 as pb
from goodspec.v1 import generation_pb2_grpc as pb_grpc
from goodspec.workers.sampling import SamplingParams

log = logging.getLogger("goodspec.server")
SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
HEALTH_EXEMPT = "/grpc.health.v1.Health/"
REPLACE_BACKOFF_S = 30.0


class _Malformed:
    """What a request body that does not parse turns into: the handler answers INVALID_ARGUMENT
    (gRPC itself would answer a failed deserialisation with a status the README never promises)."""

    def __init__(self, kind: str, error: Exception) -> None:
        self.message = f"request body is not a valid {kind}: {error}"


def _parser(message_cls):
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except Exception as e:  # noqa: BLE001 - DecodeError and friends
            return _Malformed(message_cls.DESCRIPTOR.name, e)

    return parse


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, group: EngineGroup, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.group = group
        self.config = config
        self.metrics = metrics
        info = group.model_info()
        self.max_context = info["max_context"]
        self.info = info
        self.in_flight = 0
        self.cancelled = 0
        self.rejected = 0
        self.draining = False
        self._per_connection: dict[str, int] = {}  # peer (one HTTP/2 connection) -> in flight
        self._request_ids: set[str] = set()  # client request_ids in flight

    def _reserve(self, peer: str) -> None:
        """Take an admission slot, or raise. One connection may hold at most
        max_requests_per_connection of the max_queued_requests slots, so a client that opens
        streams and never reads them cannot lock the others out."""
        c = self.config
        if self.draining:
            raise Draining("server is draining (shutting down); retry on another replica")
        if self.in_flight >= c.max_queued_requests:
            raise QueueFull(f"queue full: {self.in_flight} requests in flight "
                            f"(max_queued_requests={c.max_queued_requests})")
        if self._per_connection.get(peer, 0) >= c.max_requests_per_connection:
            raise QueueFull(f"this connection has {c.max_requests_per_connection} requests in flight "
                            f"(max_requests_per_connection={c.max_requests_per_connection})")
        self.in_flight += 1
        self._per_connection[peer] = self._per_connection.get(peer, 0) + 1
        self.metrics.in_flight.inc()

    def _release(self, peer: str) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.dec()
        left = self._per_connection.pop(peer) - 1
        if left:
            self._per_connection[peer] = left

    async def _admit(self, req, context) -> GenerateInput:
        if isinstance(req, _Malformed):
            raise ValueError(req.message)
        # Tokenising (and the size checks before it) off the event loop: a large prompt must
        # not freeze every other stream.
        inp = await asyncio.to_thread(validate, req, self.group.codec, self.max_context, self.config)
        if inp.request_id:
            if inp.request_id in self._request_ids:
                raise DuplicateRequest(f"request_id {inp.request_id!r} is in flight; retry once it has ended")
            self._request_ids.add(inp.request_id)
        return inp

    async def _stream(self, req, context: grpc.aio.ServicerContext):
        """Yields (client request_id, chunk); raises mapped statuses through context.abort."""
        m = self.metrics
        peer = context.peer()
        try:
            self._reserve(peer)
        except Exception as e:  # noqa: BLE001 - mapped to a status in one place
            self.rejected += 1
            m.requests.labels("rejected").inc()
            await context.abort(*status_of(e))
        t0 = time.perf_counter()
        first_token = True
        finished = failed = False
        inp = None
        try:
            try:
                inp = await self._admit(req, context)
            except Exception as e:  # noqa: BLE001
                failed = True
                self.rejected += 1
                m.requests.labels("rejected").inc()
                await context.abort(*status_of(e))
            request_id = inp.request_id or f"req-{uuid.uuid4().hex[:12]}"
            # The engine's id is always fresh: a retry with the client's id may arrive while the
            # engine is still freeing the cancelled original.
            stream = self.group.generate(
                inp.prompt, inp.sampling, req_id=f"{request_id}#{uuid.uuid4().hex[:8]}",
                policy=inp.policy, max_k=inp.max_k, num_prompt_tokens=len(inp.prompt_ids),
            )
            # aclosing: a client cancel can land while grpc awaits a write (GeneratorExit at our
            # yield, not CancelledError), so close the engine stream here, not whenever GC does.
            async with contextlib.aclosing(stream):
                async for _, chunk in stream:
                    if chunk.finished and chunk.finish_reason == "error":
                        raise EngineFailed(chunk.error or "the engine failed this request")
                    if chunk.token_ids:
                        m.tokens.inc(len(chunk.token_ids))
                        if first_token:
                            m.ttft.observe(time.perf_counter() - t0)
                            first_token = False
                    finished = chunk.finished
                    yield request_id, chunk
            if finished:
                m.latency.observe(time.perf_counter() - t0)
                m.requests.labels("finished").inc()
        except Exception as e:  # noqa: BLE001
            if failed:
                raise  # the admission abort above
            failed = True
            if isinstance(e, ValueError):
                self.rejected += 1
            m.requests.labels("rejected" if isinstance(e, ValueError) else "failed").inc()
            await context.abort(*status_of(e))
        finally:
            self._release(peer)
            if inp is not None and inp.request_id:
                self._request_ids.discard(inp.request_id)
            if not finished and not failed:
                self.cancelled += 1  # client cancel or deadline; the engine stream aborted and freed it
                m.requests.labels("cancelled").inc()
                log.info("request cancelled by the client")

    async def Generate(self, request, context):
        """Chunks written one at a time; a client that does not take one within
        stream_write_timeout_s (HTTP/2 flow control holds the write) loses the stream."""
        timeout = self.config.stream_write_timeout_s
        async with contextlib.aclosing(self._stream(request, context)) as chunks:
            async for request_id, chunk in chunks:
                try:
                    await asyncio.wait_for(context.write(to_response(chunk, request_id)), timeout)
                except asyncio.TimeoutError:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        f"the client read no chunk for {timeout}s "
                                        f"(stream_write_timeout_s); stream ended")

    async def Complete(self, request, context):
        text, ids, last, request_id = [], [], None, ""
        async for request_id, chunk in self._stream(request, context):
            text.append(chunk.text)
            ids += chunk.token_ids
            last = chunk
        msg = to_response(last, request_id)
        msg.text = "".join(text)
        msg.ClearField("token_ids")
        msg.token_ids.extend(ids)
        return msg

    async def GetModelInfo(self, request, context):
        i = self.info
        return pb.ModelInfo(
            target_model=model_name(i["target"]), draft_model=model_name(i["draft"]) if i["draft"] else "", max_context_length=i["max_context"],
            vocab_size=i["vocab_size"], speculation_policy=i["policy"], proposer=i["proposer"],
            replicas=i["replicas"])

    async def GetServerStats(self, request, context):
        stats = await asyncio.to_thread(self.group.stats)
        engines = [pb.EngineStats(
            replica=s["replica"], running=s["running"], waiting=s["waiting"],
            target_kv_blocks_used=s["target_blocks_used"], draft_kv_blocks_used=s["draft_blocks_used"],
            num_steps=s["num_steps"], mean_k=s["mean_k"], acceptance_rate=s["acceptance_rate"] or 0.0,
            k_histogram={int(k): v for k, v in s["k_histogram"].items()},
            worker_failures=s["worker_failures"], unhealthy=s["unhealthy"] or "",
        ) for s in stats]
        return pb.ServerStats(engines=engines, requests_in_flight=self.in_flight,
                              requests_cancelled=self.cancelled, requests_rejected=self.rejected,
                              draining=self.draining)


def model_name(model_dir: str) -> str:
    """What GetModelInfo says of a model: its name, never a path on the server's disk."""
    from goodspec.gguf_import import source_name

    return source_name(model_dir)


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


def _generation_handlers(servicer: GenerationServicer) -> grpc.GenericRpcHandler:
    """The generated registration, with request parsers that never fail (see _Malformed)."""
    request = _parser(pb.GenerateRequest)
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=request,
            response_serializer=pb.GenerateResponse.SerializeToString),
        "Complete": grpc.unary_unary_rpc_method_handler(
            servicer.Complete, request_deserializer=request,
            response_serializer=pb.GenerateResponse.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, request_deserializer=_parser(pb.GetModelInfoRequest),
            response_serializer=pb.ModelInfo.SerializeToString),
        "GetServerStats": grpc.unary_unary_rpc_method_handler(
            servicer.GetServerStats, request_deserializer=_parser(pb.GetServerStatsRequest),
            response_serializer=pb.ServerStats.SerializeToString),
    }
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


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
        self.server.add_generic_rpc_handlers((_generation_handlers(self.servicer),))
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


async def serve_forever(group: EngineGroup, config: ServerConfig) -> None:
    srv = GoodspecServer(group, config)
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
        self.loop.call_soon_threadsafe(self.loop.stop)
