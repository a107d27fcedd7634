"""The goodput choice's predictions, calibrated against what its chosen options accept."""

from __future__ import annotations

import numpy as np
import pytest

from goodspec.scheduler.choice_calibration import ChoiceCalibration
from goodspec.scheduler.goodput import record_features
from goodspec.scheduler.step_record import StepRecord
from tests.scheduler.test_goodput import TRUE_DRAFT, TRUE_VERIFY, synthetic_records

WEAK_LOOKUP = ("lookup", True, 1)
DRAFT = ("draft", True)


def test_a_kind_whose_chosen_verifications_fall_short_is_priced_down():
    cal = ChoiceCalibration()
    for _ in range(100):
        cal.expect(["a", "b"], [4, 2], [WEAK_LOOKUP, DRAFT], [3.0, 1.0])
        cal.observe([("a", 4, 1), ("b", 2, 1)])  # the lookup delivers a third, the draft as predicted
    f_lookup, f_draft, f_new = cal.factors([WEAK_LOOKUP, DRAFT, ("lookup", True, 4)])
    assert f_lookup == pytest.approx(1 / 3, abs=0.03)
    assert f_draft == pytest.approx(1.0)
    assert f_new == 1.0  # a kind never chosen keeps its estimator's word
    gains = np.array([[1.0, 1.9, 2.7], [1.0, 1.9, 2.7]])
    got = cal.apply(gains, [WEAK_LOOKUP, DRAFT])
    assert got[0] == pytest.approx(1.0 + f_lookup * (gains[0] - 1.0))  # the bonus token is not scaled
    assert got[1] == pytest.approx(gains[1])


def test_a_kind_that_beats_its_prediction_is_raised_but_never_past_every_token_accepted():
    cal = ChoiceCalibration()
    for _ in range(100):
        cal.expect(["a"], [2], [DRAFT], [0.5])
        cal.observe([("a", 2, 2)])
    assert cal.factors([DRAFT])[0] == cal.max_factor
    got = cal.apply(np.array([[1.0, 1.8, 2.4]]), [DRAFT])
    assert got[0] == pytest.approx([1.0, 1.99, 2.98])  # each drafted token at most 0.99


def test_a_verification_of_another_k_than_chosen_teaches_nothing():
    """The scheduler may cut a choice (adaptive verification, KV room): that outcome was never
    predicted."""
    cal = ChoiceCalibration()
    cal.expect(["a", "b"], [4, 0], [WEAK_LOOKUP, DRAFT], [3.0, 0.0])
    cal.observe([("a", 2, 0), ("b", 0, 0)])
    assert cal.factors([WEAK_LOOKUP, DRAFT]).tolist() == [1.0, 1.0]
    cal.observe([("a", 4, 0)])  # the pending choice was spent by the outcome above
    assert cal.factors([WEAK_LOOKUP]).tolist() == [1.0]
    cal.expect(["c"], [3], [DRAFT], [1.0])
    cal.forget("c")
    cal.observe([("c", 3, 0)])
    assert cal.factors([DRAFT]).tolist() == [1.0]


def _stream(calibrate: bool) -> list[int]:
    """New greedy requests every step, with no n-gram match for prompt lookup. Lookup's class
    estimator hears from the shadow that such proposals are accepted whole (other requests' text),
    but every lookup the choice takes for these requests is rejected at once; the draft accepts
    about half of what it proposes. Returns the lookup choices per step."""
    from goodspec.scheduler.lookup import LookupIndex
    from goodspec.scheduler.policy import GoodputPolicy
    from goodspec.scheduler.request import Request
    from goodspec.workers.sampling import SamplingParams

    policy = GoodputPolicy(calibrate=calibrate)
    policy.offer_lookup()
    policy.seed(synthetic_records(seed=1))
    rng = np.random.default_rng(0)
    lookups = []
    for step in range(120):
        reqs = []
        for i in range(4):
            r = Request(f"s{step}r{i}", list(range(100, 300)), SamplingParams(max_new_tokens=10_000))
            r.lookup = LookupIndex()
            r.lookup.extend(r.token_ids)  # all distinct: no match
            r.target_len = r.draft_len = len(r.token_ids) - 1
            reqs.append(r)
        ks = policy.choose(reqs, [8] * 4)
        used = [policy.uses_lookup(r.req_id) for r in reqs]
        lookups.append(sum(u and k > 0 for u, k in zip(used, ks)))
        accepted = [0 if u else int(rng.binomial(k, 0.5)) for u, k in zip(used, ks)]
        policy.observe_lookup([(f"shadow{step}_{j}", 4, 4) for j in range(8)])
        record = StepRecord(batch_size=4, num_decode=4, num_draft_reqs=sum(k > 0 for k in ks), draft_tokens=sum(ks),
                            verify_tokens=4 + sum(ks), context_tokens=800, max_context=200 + max(ks),
                            max_k=max(ks), num_accepted=sum(accepted), draft_time=0.0, verify_time=0.0,
                            draft_compute_time=0.0, verify_compute_time=0.0, step_time=0.0, ks=list(ks))
        d, v = record_features(record)
        record.draft_time, record.verify_time = float(np.dot(TRUE_DRAFT, d)), float(np.dot(TRUE_VERIFY, v))
        policy.observe([(r.req_id, k, a) for r, k, a in zip(reqs, ks, accepted)], record)
        for r in reqs:
            policy.forget(r.req_id)
    return lookups


def test_the_choice_stops_taking_a_kind_of_lookup_that_fails_whenever_it_is_chosen():
    uncalibrated, calibrated = _stream(False), _stream(True)
    assert sum(uncalibrated[-40:]) >= 100  # the class estimate alone keeps choosing it
    assert sum(calibrated[-40:]) <= 10
