"""How one engine's output reaches the EngineGroup: one Ray stream per consumer, not per request.

A streamed Ray object costs both processes a few hundred microseconds of CPU (serialising, the
core worker's bookkeeping, a wake-up on each side), and on a small machine that CPU comes out of
the target's forward. One stream per request, one object per request per step, made a batch-13
decode step of the real pair over Ray 43 ms where the same steps with one object per request
in all took 37 (BENCHMARKS.md, twenty-sixth session). So each consumer (an event loop of the
EngineGroup's process) opens one stream per engine, `EngineActor.outputs`, and every wake-up of
it carries all the chunks the scheduler emitted since the last: about one object per step,
whatever the batch. vLLM's AsyncLLM hands its output processor one message per engine step
for the same reason.

- `Outbox` (in the scheduler actor): the chunks waiting for one consumer, and the requests it
  has open there, which are aborted when the consumer's stream goes away.
- `OutputRouter` (in the consumer): reads one engine's stream on the consumer's event loop and
  hands each chunk to its request's queue.
"""

from __future__ import annotations

import asyncio
import threading
import uuid

import ray

from goodspec.scheduler.service import StreamChunk

LOST = None  # put in a request's queue when the stream that feeds it ended


class Outbox:
    """Chunks for one consumer. `put` runs on the scheduler's emitter thread; the actor's event
    loop is woken once per batch of chunks, not once per chunk."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._chunks: list[StreamChunk] = []
        self._ready = asyncio.Event()
        self.open: set[str] = set()  # requests submitted through this outbox and not finished

    def put(self, chunk: StreamChunk) -> None:
        with self._lock:
            self._chunks.append(chunk)
            first = len(self._chunks) == 1
        if first:  # the loop is woken by the first chunk; the rest ride along
            self._loop.call_soon_threadsafe(self._ready.set)

    async def take(self) -> list[StreamChunk]:
        """The chunks put since the last take (waits for at least one wake-up; may be empty)."""
        await self._ready.wait()
        self._ready.clear()
        with self._lock:
            chunks, self._chunks = self._chunks, []
        for c in chunks:
            if c.finished:
                self.open.discard(c.req_id)
        return chunks


class OutputRouter:
    """One engine's output stream read on one event loop: each chunk goes to the queue of the
    request it belongs to (registered before the request is submitted, so none is missed).
    When the stream ends (the scheduler actor died, or this loop is closing), every waiting
    request gets LOST and `error` says why."""

    def __init__(self, actor, on_end) -> None:
        self.subscriber = uuid.uuid4().hex
        self.queues: dict[str, asyncio.Queue] = {}
        self.error: BaseException | None = None
        self.batches = self.chunks = 0  # what the stream carried: chunks per batch is the point
        loop = asyncio.get_running_loop()
        self._opened = loop.create_future()  # the stream's first (empty) batch: its outbox exists
        self._stream = actor.outputs.options(num_returns="streaming").remote(self.subscriber)
        self._on_end = on_end
        self._task = loop.create_task(self._pump())

    @property
    def live(self) -> bool:
        return not self._task.done()

    async def opened(self) -> None:
        """Returns once the actor holds this consumer's outbox (submits before it are refused);
        raises what ended the stream if it ended first."""
        await asyncio.shield(self._opened)

    async def _pump(self) -> None:
        try:
            async for ref in self._stream:
                chunks = await ref
                if not self._opened.done():  # the first, empty batch
                    self._opened.set_result(None)
                    continue
                self.batches += 1
                self.chunks += len(chunks)
                for chunk in chunks:
                    queue = self.queues.get(chunk.req_id)
                    if queue is not None:
                        queue.put_nowait(chunk)
            self.error = RuntimeError("the scheduler actor ended its output stream")
        except asyncio.CancelledError:  # this loop is closing: its requests are being cancelled too
            self.error = RuntimeError("the consumer's event loop closed")
            raise
        except Exception as e:  # noqa: BLE001 - handed to every waiting request
            self.error = e
        finally:
            try:
                ray.cancel(self._stream)  # the actor's side aborts what is still open there
            except Exception:  # noqa: BLE001 - the stream or its actor is already gone
                pass
            self._on_end(self)
            if not self._opened.done():
                self._opened.set_exception(self.error)
                self._opened.exception()  # retrieved: no "never retrieved" warning if nobody waits
            for queue in self.queues.values():
                queue.put_nowait(LOST)
