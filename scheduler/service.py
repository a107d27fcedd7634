"""SchedulerService: the one thread that owns a Scheduler, and per-request streams.

Front ends (the Ray engine actor, tests) submit requests from any thread and receive
`StreamChunk`s through a callback. They never touch the Scheduler: commands go through an inbox
that the step loop drains at each step boundary, so the scheduler stays single-threaded code
without a lock. Detokenising and the callbacks run on a second thread, off the step path.
"""

from __future__ import annotations

import queue
import threading
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from goodspec.scheduler.errors import EngineUnhealthy
from goodspec.scheduler.plan import RequestOutput
from goodspec.scheduler.policy import PolicySpec
from goodspec.scheduler.request import FinishReason, Request
from goodspec.scheduler.scheduler import Scheduler
from goodspec.workers.sampling import SamplingParams
from goodspec.workers.tokenizer import IncrementalDetokenizer, TextCodec

T = TypeVar("T")


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    draft_tokens_proposed: int = 0
    draft_tokens_accepted: int = 0
    mean_k: float = 0.0
    num_preemptions: int = 0
    lookup_tokens_proposed: int = 0  # of draft_tokens_proposed: from prompt lookup
    lookup_tokens_accepted: int = 0


def usage_of(req: Request) -> Usage:
    return Usage(
        prompt_tokens=req.num_prompt, completion_tokens=req.num_output,
        draft_tokens_proposed=req.num_draft_proposed, draft_tokens_accepted=req.num_draft_accepted,
        mean_k=round(req.mean_k, 4), num_preemptions=req.num_preemptions,
        lookup_tokens_proposed=req.num_lookup_proposed, lookup_tokens_accepted=req.num_lookup_accepted,
    )


@dataclass
class Completion:
    """A whole request's result, in process or gathered from a stream."""

    req_id: str
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None  # None: still running
    usage: Usage
    replica: int = 0
    error: str | None = None

    def to_json(self) -> dict:
        """The `goodspec generate --json` contract."""
        u = self.usage
        return {
            "req_id": self.req_id, "prompt": self.prompt, "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason.value if self.finish_reason else "running",
            "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "draft_tokens_proposed": u.draft_tokens_proposed,
            "draft_tokens_accepted": u.draft_tokens_accepted, "mean_k": u.mean_k,
            "lookup_tokens_proposed": u.lookup_tokens_proposed, "lookup_tokens_accepted": u.lookup_tokens_accepted,
            "num_preemptions": u.num_preemptions, "replica": self.replica,
            **({"error": self.error} if self.error else {}),
        }


@dataclass
class StreamChunk:
    """New output of one request since its previous chunk; `usage` is set on the final one."""

    req_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: FinishReason | None = None  # set once finished
    usage: Usage | None = None
    error: str | None = None


@dataclass
class _Stream:
    """The emitter thread's state for one request's stream."""

    req_id: str
    callback: Callable[[StreamChunk], None]
    detok: IncrementalDetokenizer
    output_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class _Emit:
    """What a step produced for one stream, taken by the loop thread for the emitter."""

    stream: _Stream
    new_token_ids: list[int]
    num_output: int  # output length after the step (a stop string may have cut earlier tokens)
    finish_reason: FinishReason | None
    usage: Usage | None
    error: str | None


class SchedulerService:
    """Owns the Scheduler on one thread, the step loop. Other threads put commands in an inbox
    the loop drains at each step boundary (submit, abort, or any read of its state through
    `call`) and get each answer through a Future."""

    def __init__(self, scheduler: Scheduler, codec: TextCodec, idle_wait_s: float = 0.05) -> None:
        self.scheduler = scheduler
        self.codec = codec
        self._streams: dict[str, _Stream] = {}  # the loop thread's
        self._inbox: queue.SimpleQueue[tuple[Callable[[], object], Future]] = queue.SimpleQueue()
        self._emits: queue.SimpleQueue[list[_Emit] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._idle_wait_s = idle_wait_s
        self._threads: list[threading.Thread] = []
        self.loop_error: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._threads = [threading.Thread(target=self._loop, name="goodspec-scheduler", daemon=True),
                         threading.Thread(target=self._emit_loop, name="goodspec-emitter", daemon=True)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put((lambda: None, Future()))  # wakes an idle loop
        for t in self._threads:
            t.join(timeout=10)

    # -- commands (from any thread) --------------------------------------------------------------
    def call_async(self, fn: Callable[[Scheduler], T]) -> Future:
        """fn(scheduler), run on the loop thread at the next step boundary."""
        future: Future = Future()
        if self._stop.is_set():
            future.set_exception(EngineUnhealthy("the scheduler service has stopped"))
        else:
            self._inbox.put((lambda: fn(self.scheduler), future))
        return future

    def call(self, fn: Callable[[Scheduler], T]) -> T:
        return self.call_async(fn).result()

    def submit_async(
        self, req_id: str, prompt_ids: list[int], sampling: SamplingParams,
        callback: Callable[[StreamChunk], None], policy: PolicySpec | None = None,
        max_k: int | None = None,
    ) -> Future:
        """Queue a request; the future raises RequestRejected / EngineUnhealthy if it is refused.
        `callback` gets its chunks, in order, on the emitter thread."""
        def submit(scheduler: Scheduler) -> None:
            if self.loop_error is not None:
                raise EngineUnhealthy(self.loop_error)
            scheduler.add_request(req_id, prompt_ids, sampling, policy, max_k)
            self._streams[req_id] = _Stream(req_id, callback, IncrementalDetokenizer(self.codec, sampling.stop))

        return self.call_async(submit)

    def submit(self, *args, **kwargs) -> None:
        self.submit_async(*args, **kwargs).result()

    def abort_async(self, req_id: str) -> Future:
        """Cancel: the caches are freed when the future resolves; the stream gets a final chunk."""
        return self.call_async(lambda s: s.abort(req_id))

    def abort(self, req_id: str) -> bool:
        return self.abort_async(req_id).result()

    # -- the loop thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain(0.0 if self.scheduler.has_work() else self._idle_wait_s)
                if self._stop.is_set() or not self.scheduler.has_work():
                    continue
                try:
                    outputs = self.scheduler.step()
                except Exception:  # a bug, not a worker failure: fail loudly, stay up
                    self.loop_error = "scheduler step failed:\n" + traceback.format_exc()
                    outputs = self.scheduler.fail_all(self.loop_error)
                self._emits.put([e for e in map(self._take, outputs) if e is not None])
                if self.loop_error is not None:
                    return
        finally:
            self._emits.put(None)
            self._refuse_queued()

    def _drain(self, wait_s: float) -> None:
        """Run the queued commands; with none queued, wait up to wait_s for one."""
        try:
            item = self._inbox.get(timeout=wait_s) if wait_s > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            command, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(command())
                except BaseException as e:  # noqa: BLE001 - raised to the caller
                    future.set_exception(e)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _refuse_queued(self) -> None:
        while True:
            try:
                _, future = self._inbox.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineUnhealthy(self.loop_error or "the scheduler service has stopped"))

    def _take(self, out: RequestOutput) -> _Emit | None:
        stream = self._streams.get(out.req_id)
        req = self.scheduler.requests.get(out.req_id)
        if stream is None or req is None:
            return None
        emit = _Emit(stream, list(out.new_token_ids), req.num_output,
                     out.finish_reason if out.finished else None,
                     usage_of(req) if out.finished else None, req.error)
        if out.finished:
            del self._streams[out.req_id]
            self.scheduler.pop_finished(out.req_id)
        return emit

    # -- the emitter thread ----------------------------------------------------------------------
    def _emit_loop(self) -> None:
        while (batch := self._emits.get()) is not None:
            for e in batch:
                stream = e.stream
                stream.output_ids += e.new_token_ids
                del stream.output_ids[e.num_output:]
                finished = e.finish_reason is not None
                chunk = StreamChunk(stream.req_id, e.new_token_ids,
                                    stream.detok.update(stream.output_ids, final=finished), finished)
                if finished:
                    chunk.finish_reason, chunk.usage, chunk.error = e.finish_reason, e.usage, e.error
                try:
                    stream.callback(chunk)
                except Exception:  # noqa: BLE001 - one consumer's bug must not stop the others
                    traceback.print_exc()
