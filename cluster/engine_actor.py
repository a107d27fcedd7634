"""The scheduler process of one engine: a SchedulerService driving remote draft/target workers,
exposed as an async Ray actor: `submit` queues a request, `outputs` streams each consumer's
chunks (goodspec.cluster.output_stream)."""

from __future__ import annotations

import asyncio

from goodspec.cluster.output_stream import Outbox
from goodspec.cluster.remote_worker import RemoteWorker
from goodspec.config import EngineConfig
from goodspec.engine import build_scheduler
from goodspec.scheduler.config import KVBudget
from goodspec.scheduler.policy import PolicySpec
from goodspec.scheduler.profiler import device_key
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
        t_info = ray.get(target_handle.info.remote(), timeout=startup_timeout_s)
        d_info = ray.get(draft_handle.info.remote(), timeout=startup_timeout_s) if draft_handle else None
        self.worker_info = {"target": t_info, "draft": d_info}
        if d_info is not None:
            self.draft.reads_features = d_info.reads_features
            self.draft.feature_layers = tuple(d_info.feature_layers)
        scheduler = build_scheduler(
            config, self.codec, self.target, KVBudget(t_info.num_blocks, t_info.block_size),
            t_info.max_context, self.draft,
            KVBudget(d_info.num_blocks, d_info.block_size) if d_info else None,
            d_info.max_context if d_info else None,
            device_key=device_key((t_info.device, t_info.weights, t_info.onednn_linears),
                                  (d_info.device, d_info.weights, d_info.onednn_linears) if d_info else None, "ray",
                                  t_info.huge_pages),
        )
        self.service = SchedulerService(scheduler, self.codec)
        self.service.start()
        self._outboxes: dict[str, Outbox] = {}  # subscriber -> its chunks and open requests

    def ready(self) -> dict:
        return {"replica": self.replica, "target": self.worker_info["target"],
                "draft": self.worker_info["draft"]}

    async def submit(self, req_id: str, prompt_ids: list[int], sampling: SamplingParams,
                     policy: PolicySpec | None, max_k: int | None, subscriber: str) -> None:
        """Queue a request whose chunks go out on the consumer's stream (`outputs(subscriber)`).
        Errors in the request raise here. A cancel that lands while submitting aborts once the
        submission is in."""
        box = self._outboxes.get(subscriber)
        if box is None:  # the consumer waits for its stream's first batch before submitting
            raise RuntimeError(f"no output stream is open for consumer {subscriber!r}")
        box.open.add(req_id)
        submitted = asyncio.wrap_future(self.service.submit_async(
            req_id, prompt_ids, sampling, box.put, policy, max_k))
        try:
            await asyncio.shield(submitted)
        except asyncio.CancelledError:
            submitted.add_done_callback(lambda f: f.exception() is None and self._abort_soon(req_id))
            raise
        except BaseException:
            box.open.discard(req_id)
            raise

    async def outputs(self, subscriber: str):
        """Async generator, one per consumer (an EngineGroup event loop): lists of StreamChunks
        of every request submitted with this `subscriber`, one list per wake-up (about one per
        step; see goodspec.cluster.output_stream). When the consumer goes away (cancel, death),
        its unfinished requests are aborted and freed."""
        box = self._outboxes[subscriber] = Outbox(asyncio.get_running_loop())
        try:
            yield []  # opened: the consumer may submit from now on
            while True:
                chunks = await box.take()
                if chunks:
                    yield chunks
        finally:
            self._outboxes.pop(subscriber, None)
            for req_id in box.open:
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

