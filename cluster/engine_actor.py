"""The scheduler process of one engine: a SchedulerService driving remote draft/target workers,
exposed as an async Ray actor whose `generate` streams StreamChunks."""

from __future__ import annotations

import asyncio
from typing import Callable

from goodspec.cluster.remote_worker import RemoteWorker
from goodspec.config import EngineConfig
from goodspec.engine import build_scheduler
from goodspec.scheduler.config import KVBudget
from goodspec.scheduler.policy import PolicySpec
from goodspec.scheduler.service import SchedulerService, StreamChunk
from goodspec.scheduler.stats import EngineStats
from goodspec.workers.sampling import SamplingParams
from goodspec.workers.tokenizer import TextCodec


class EngineActor:
    def __init__(self, config: EngineConfig, target_handle, draft_handle, call_timeout_s: float,
                 startup_timeout_s: float, channel_token: str, replica: int = 0) -> None:
        import ray

        self.replica = replica
        self.codec = TextCodec.load(config.target_dir, config.draft_dir)
        self.target = RemoteWorker(target_handle, f"target[{replica}]", call_timeout_s, channel_token)
        self.draft = (RemoteWorker(draft_handle, f"draft[{replica}]", call_timeout_s, channel_token)
                      if draft_handle else None)
        if config.proposer == "ngram":
            from goodspec.workers.ngram_proposer import NgramProposer

            self.draft = NgramProposer()  # cheap CPU work: runs here, no actor
        t_info = ray.get(target_handle.info.remote(), timeout=startup_timeout_s)
        d_info = ray.get(draft_handle.info.remote(), timeout=startup_timeout_s) if draft_handle else None
        self.worker_info = {"target": t_info, "draft": d_info}
        scheduler = build_scheduler(
            config, self.codec, self.target, KVBudget(t_info.num_blocks, t_info.block_size),
            t_info.max_context, self.draft,
            KVBudget(d_info.num_blocks, d_info.block_size) if d_info else None,
            d_info.max_context if d_info else None, device_key=[t_info.device, t_info.dtype, "ray"],
        )
        self.service = SchedulerService(scheduler, self.codec)
        self.service.start()
        # For Ray Client drivers: the requests they opened, and chunks not yet polled.
        self._polled: set[str] = set()
        self._outbox: list[tuple[int, StreamChunk]] = []  # (number, chunk), numbered from 1
        self._sent = 0
        self._outbox_ready = asyncio.Event()

    def ready(self) -> dict:
        return {"replica": self.replica, "target": self.worker_info["target"],
                "draft": self.worker_info["draft"]}

    async def _submit(self, req_id: str, prompt_ids: list[int], sampling: SamplingParams,
                      policy: PolicySpec | None, max_k: int | None,
                      sink: Callable[[StreamChunk], None]) -> None:
        """Submit a request whose StreamChunks are handed to `sink` on this event loop. Errors
        in the request raise here. A cancel that lands while submitting aborts once the
        submission is in."""
        loop = asyncio.get_running_loop()
        submitted = asyncio.wrap_future(self.service.submit_async(
            req_id, prompt_ids, sampling, lambda c: loop.call_soon_threadsafe(sink, c), policy, max_k))
        try:
            await asyncio.shield(submitted)
        except asyncio.CancelledError:
            submitted.add_done_callback(lambda f: f.exception() is None and self._abort_soon(req_id))
            raise

    async def generate(self, req_id: str, prompt_ids: list[int], sampling: SamplingParams,
                       policy: PolicySpec | None = None, max_k: int | None = None):
        """Async generator of StreamChunks; errors in the request raise before the first chunk.
        If the consumer goes away (cancel, deadline), the request is aborted and freed."""
        queue: asyncio.Queue[StreamChunk] = asyncio.Queue()
        await self._submit(req_id, prompt_ids, sampling, policy, max_k, queue.put_nowait)
        finished = False
        try:
            while not finished:
                chunk = await queue.get()
                finished = chunk.finished
                yield chunk
        finally:
            if not finished:
                self._abort_soon(req_id)

    # Ray Client (ray://) cannot carry streaming actor methods. A driver connected that way
    # opens requests and long-polls the chunks of all of them: one call through the client
    # proxy per step, not one per request per step.
    async def open(self, req_id: str, prompt_ids: list[int], sampling: SamplingParams,
                   policy: PolicySpec | None = None, max_k: int | None = None) -> None:
        self._polled.add(req_id)
        try:
            await self._submit(req_id, prompt_ids, sampling, policy, max_k, self._to_outbox)
        except BaseException:
            self._polled.discard(req_id)
            raise

    def _to_outbox(self, chunk: StreamChunk) -> None:
        self._sent += 1
        self._outbox.append((self._sent, chunk))
        self._outbox_ready.set()
        if chunk.finished:
            self._polled.discard(chunk.req_id)

    async def poll(self, acked: int, wait_s: float) -> tuple[int, list[StreamChunk]]:
        """Every chunk after number `acked` (the last one the driver handled), waiting up to
        wait_s for one; returns the number of the last chunk too. Chunks stay until a later
        poll acknowledges them: a poll whose answer the driver never read (its event loop
        ended mid-call) then loses nothing."""
        done = 0
        while done < len(self._outbox) and self._outbox[done][0] <= acked:
            done += 1
        del self._outbox[:done]
        if not self._outbox:
            self._outbox_ready.clear()
            try:
                await asyncio.wait_for(self._outbox_ready.wait(), wait_s)
            except asyncio.TimeoutError:
                return acked, []
        return self._outbox[-1][0], [chunk for _, chunk in self._outbox]

    async def close(self, req_id: str) -> None:
        """The consumer is done: abort the request if it has not finished."""
        if req_id in self._polled:
            self._polled.discard(req_id)
            self._abort_soon(req_id)

    def _abort_soon(self, req_id: str) -> None:
        """Abort at the scheduler's next step boundary, without waiting for it."""
        self.service.abort_async(req_id)

    async def abort(self, req_id: str) -> bool:
        return await asyncio.wrap_future(self.service.abort_async(req_id))

    async def stats(self) -> EngineStats:
        """Counters for operators and tests, read by the scheduler's own thread."""
        return await asyncio.wrap_future(self.service.call_async(
            lambda s: EngineStats.of(s, self.replica, self.service.loop_error)))

    async def step_records(self, last: int = 0) -> list[dict]:
        return await asyncio.wrap_future(self.service.call_async(
            lambda s: [r.to_dict() for r in s.step_records[-last:]]))

    def worker_pids(self) -> dict:
        import ray

        return {k: ray.get(h.handle.info.remote(), timeout=60).pid
                for k, h in (("target", self.target), ("draft", self.draft)) if hasattr(h, "handle")}

    def shutdown(self) -> None:
        self.service.stop()

