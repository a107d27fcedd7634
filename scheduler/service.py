"""SchedulerService: the scheduler's step loop on its own thread, with per-request streams.

Front ends (the Ray engine actor, tests) submit requests from any thread and receive
`StreamChunk`s through a callback; the loop thread owns the Scheduler, and a lock serialises
submissions and aborts with steps, so the scheduler itself stays single-threaded code.
"""

from __future__ import annotations

import contextlib
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from goodspec.scheduler.policy import SpeculationPolicy
from goodspec.scheduler.request import Request
from goodspec.scheduler.scheduler import Scheduler
from goodspec.workers.sampling import SamplingParams
from goodspec.workers.tokenizer import IncrementalDetokenizer, TextCodec


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    draft_tokens_proposed: int = 0
    draft_tokens_accepted: int = 0
    mean_k: float = 0.0
    num_preemptions: int = 0


def usage_of(req: Request) -> Usage:
    return Usage(
        prompt_tokens=req.num_prompt, completion_tokens=req.num_output,
        draft_tokens_proposed=req.num_draft_proposed, draft_tokens_accepted=req.num_draft_accepted,
        mean_k=round(req.mean_k, 4), num_preemptions=req.num_preemptions,
    )


@dataclass
class Completion:
    """A whole request's result, in process or gathered from a stream."""

    req_id: str
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    replica: int = 0
    error: str | None = None

    def to_json(self) -> dict:
        """The `goodspec generate --json` contract."""
        u = self.usage
        return {
            "req_id": self.req_id, "prompt": self.prompt, "text": self.text,
            "token_ids": self.token_ids, "finish_reason": self.finish_reason,
            "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "draft_tokens_proposed": u.draft_tokens_proposed,
            "draft_tokens_accepted": u.draft_tokens_accepted, "mean_k": u.mean_k,
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
    finish_reason: str | None = None  # FinishReason value once finished
    usage: Usage | None = None
    error: str | None = None


@dataclass
class _Stream:
    callback: Callable[[StreamChunk], None]
    detok: IncrementalDetokenizer
    prompt: str = ""
    submitted: float = field(default_factory=time.monotonic)


class _StepLock:
    """The scheduler's lock. The step loop takes it for a whole step and retakes it at once, and
    a plain Lock is not fair: a submit waiting on another thread could sit out several steps (at
    8 req/s, tens of ms of time-to-first-token). Callers from other threads are let in first at
    the next step boundary."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._callers = 0
        self._no_callers = threading.Event()
        self._no_callers.set()

    def __enter__(self) -> None:
        with self._count_lock:
            self._callers += 1
            self._no_callers.clear()
        self._lock.acquire()

    def __exit__(self, *exc) -> None:
        self._lock.release()
        with self._count_lock:
            self._callers -= 1
            if self._callers == 0:
                self._no_callers.set()

    @contextlib.contextmanager
    def for_step(self):
        self._no_callers.wait()
        with self._lock:
            yield


class SchedulerService:
    def __init__(self, scheduler: Scheduler, codec: TextCodec, idle_wait_s: float = 0.05) -> None:
        self.scheduler = scheduler
        self.codec = codec
        self._streams: dict[str, _Stream] = {}
        self._lock = _StepLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle_wait_s = idle_wait_s
        self._thread: threading.Thread | None = None
        self.loop_error: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="goodspec-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- requests -------------------------------------------------------------------------------
    def submit(
        self, req_id: str, prompt: str, sampling: SamplingParams,
        callback: Callable[[StreamChunk], None], policy: SpeculationPolicy | None = None,
        max_k: int | None = None,
    ) -> Request:
        """Queue a request; raises RequestRejected / EngineUnhealthy / ValueError at once."""
        prompt_ids = self.codec.encode(prompt)
        with self._lock:
            if self.loop_error is not None:
                from goodspec.scheduler.scheduler import EngineUnhealthy

                raise EngineUnhealthy(self.loop_error)
            req = self.scheduler.add_request(req_id, prompt_ids, sampling, policy, max_k)
            self._streams[req_id] = _Stream(callback, IncrementalDetokenizer(self.codec, sampling.stop), prompt)
        self._wake.set()
        return req

    def abort(self, req_id: str) -> bool:
        """Cancel now: caches are freed before this returns; the stream gets a final chunk."""
        with self._lock:
            found = self.scheduler.abort(req_id)
        self._wake.set()
        return found

    def load(self) -> int:
        """Outstanding tokens: what the router balances on (prompt to prefill + tokens to go)."""
        with self._lock:
            s = self.scheduler
            return sum(
                max(0, len(r.token_ids) - r.target_len) + r.sampling.max_new_tokens - r.num_output
                for r in list(s.running) + list(s.waiting)
            )

    def locked(self) -> _StepLock:
        """Hold this to read the scheduler's state consistently from another thread."""
        return self._lock

    def num_unfinished(self) -> int:
        with self._lock:
            return len(self.scheduler.running) + len(self.scheduler.waiting)

    # -- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock.for_step():
                busy = self.scheduler.has_work()
                if busy:
                    try:
                        outputs = self.scheduler.step()
                    except Exception:  # a bug, not a worker failure: fail loudly, stay up
                        self.loop_error = "scheduler step failed:\n" + traceback.format_exc()
                        outputs = self.scheduler.fail_all(self.loop_error)
                    chunks = [self._chunk(o) for o in outputs]
            if busy:
                for stream, chunk in chunks:
                    if stream is not None:
                        stream.callback(chunk)
                if self.loop_error is not None:
                    return
                continue
            self._wake.wait(self._idle_wait_s)
            self._wake.clear()

    def _chunk(self, out) -> tuple[_Stream | None, StreamChunk]:
        """Called under the lock."""
        stream = self._streams.get(out.req_id)
        req = self.scheduler.requests.get(out.req_id)
        if stream is None or req is None:
            return None, StreamChunk(out.req_id, [], "")
        text = stream.detok.update(req.output_ids, final=out.finished)
        chunk = StreamChunk(out.req_id, list(out.new_token_ids), text, out.finished)
        if out.finished:
            chunk.finish_reason = out.finish_reason.value if out.finish_reason else None
            chunk.error = req.error
            chunk.usage = usage_of(req)
            self._streams.pop(out.req_id, None)
            self.scheduler.pop_finished(out.req_id)
        return stream, chunk
