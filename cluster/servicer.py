"""The Generation service: admission (bounded per server and per connection), validation off
the event loop, streaming with a write timeout, and the request parsers that never throw."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import grpc

from goodspec.cluster.api import (
    Draining, DuplicateRequest, EngineFailed, GenerateInput, QueueFull, status_of, to_response, validate,
)
from goodspec.cluster.group import EngineGroup
from goodspec.cluster.metrics import ServerMetrics
from goodspec.config import ServerConfig
from goodspec.scheduler.request import FinishReason
from goodspec.v1 import generation_pb2 as pb
from goodspec.v1 import generation_pb2_grpc as pb_grpc

log = logging.getLogger("goodspec.server")
SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name


def model_name(model_dir: str) -> str:
    """What GetModelInfo says of a model: its name, never a path on the server's disk."""
    from goodspec.gguf_import import source_name

    return source_name(model_dir)


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

    async def _admit(self, req) -> GenerateInput:
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
                inp = await self._admit(req)
            except Exception as e:  # noqa: BLE001
                failed = True
                self.rejected += 1
                m.requests.labels("rejected").inc()
                await context.abort(*status_of(e))
            request_id = inp.request_id or f"req-{uuid.uuid4().hex[:12]}"
            # The engine's id is always fresh: a retry with the client's id may arrive while the
            # engine is still freeing the cancelled original.
            stream = self.group.generate(
                inp.prompt_ids, inp.sampling, req_id=f"{request_id}#{uuid.uuid4().hex[:8]}",
                policy=inp.policy, max_k=inp.max_k,
            )
            # aclosing: a client cancel can land while grpc awaits a write (GeneratorExit at our
            # yield, not CancelledError), so close the engine stream here, not whenever GC does.
            async with contextlib.aclosing(stream):
                async for _, chunk in stream:
                    if chunk.finished and chunk.finish_reason is FinishReason.ERROR:
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
            replica=s.replica, running=s.running, waiting=s.waiting,
            target_kv_blocks_used=s.target_blocks_used, draft_kv_blocks_used=s.draft_blocks_used,
            num_steps=s.num_steps, mean_k=s.mean_k, acceptance_rate=s.acceptance_rate or 0.0,
            k_histogram=s.k_histogram, worker_failures=s.worker_failures, unhealthy=s.unhealthy or "",
            k_totals=s.k_totals, step_time_mape=s.step_time_mape or 0.0,
        ) for s in stats]
        return pb.ServerStats(engines=engines, requests_in_flight=self.in_flight,
                              requests_cancelled=self.cancelled, requests_rejected=self.rejected,
                              draining=self.draining)


def generation_handlers(servicer: GenerationServicer) -> grpc.GenericRpcHandler:
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
