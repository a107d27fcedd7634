"""SchedulerService: the one thread that owns the scheduler, and callers from other threads."""

import threading
import time

from goodspec.engine import LLMEngine
from goodspec.scheduler.service import SchedulerService
from goodspec.workers.sampling import SamplingParams
from tests.conftest import engine_config


def test_a_submit_from_another_thread_waits_only_for_the_step_in_progress(sharegpt_prompts):
    """A caller on another thread (the engine actor's submit, abort, stats) is served at the
    next step boundary, or a new request's first token waits several steps."""
    engine = LLMEngine(engine_config("fixed:5"))
    service = SchedulerService(engine.scheduler, engine.codec)
    finished = []
    lock = threading.Lock()

    def on_chunk(chunk):
        if chunk.finished:
            with lock:
                finished.append(chunk.req_id)

    service.start()
    try:
        for i in range(4):  # a busy batch: every step drafts 5 tokens for each
            service.submit(f"long-{i}", engine.codec.encode(sharegpt_prompts[i]),
                           SamplingParams(max_new_tokens=400, ignore_eos=True), on_chunk)
        waited = []
        for i in range(20):
            time.sleep(0.003)
            steps = engine.scheduler.step_records
            before = len(steps)
            service.submit(f"short-{i}", engine.codec.encode("Hello"),
                           SamplingParams(max_new_tokens=2, ignore_eos=True), on_chunk)
            waited.append(len(steps) - before)
        # At most the step in progress, plus one that began between reading the count and asking.
        assert max(waited) <= 2, waited
        for i in range(4):
            assert service.abort(f"long-{i}")
        deadline = time.monotonic() + 30
        while len(finished) < 24 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(finished) == sorted([f"long-{i}" for i in range(4)] + [f"short-{i}" for i in range(20)])
    finally:
        service.stop()
