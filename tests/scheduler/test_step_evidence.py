"""The goodput policy's guard drawn from its own steps: the margin."""

from __future__ import annotations

import pytest

from goodspec.scheduler.step_evidence import StepEvidence
from goodspec.scheduler.step_record import StepRecord


def record(batch: int, decode: int, accepted: int, seconds: float) -> StepRecord:
    return StepRecord(batch_size=batch, num_decode=decode, num_draft_reqs=0, draft_tokens=0,
                      verify_tokens=batch, context_tokens=0, max_context=100, max_k=0,
                      num_accepted=accepted, draft_time=seconds / 4, verify_time=3 * seconds / 4,
                      draft_compute_time=0.0, verify_compute_time=0.0, step_time=seconds)


def test_the_margin_is_the_models_recent_error_within_bounds():
    ev = StepEvidence()
    assert ev.margin == StepEvidence.MIN_MARGIN  # before any evidence
    for _ in range(50):
        ev.log(0.9, record(4, 4, 0, 1.0))  # 10% short
    ev.update()
    assert ev.margin == pytest.approx(0.1)
    for _ in range(StepEvidence.MARGIN_STEPS):
        ev.log(0.1, record(4, 4, 0, 1.0))  # 90% short: capped
    ev.update()
    assert ev.margin == StepEvidence.MAX_MARGIN


def test_a_step_with_a_prompt_chunk_is_not_a_prediction_it_can_be_judged_on():
    ev = StepEvidence()
    ev.log(0.5, record(5, 4, 0, 1.0))  # a chunk rode along: not what was predicted
    ev.log(None, record(4, 4, 0, 1.0))  # nothing was predicted
    assert ev.prediction_log == []
