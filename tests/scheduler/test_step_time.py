"""The step-time model: features of a step, the online fit, and its prediction error."""

from __future__ import annotations

import random

import numpy as np
import pytest

from goodspec.scheduler.step_record import StepRecord
from goodspec.scheduler.step_time import StepTimeModel, mape, record_features

# launch, per pass, per token, per k*ctx/1000, per 100 catch-up tokens
TRUE_DRAFT = np.array([0.0015, 0.0012, 0.00008, 0.00002, 0.002])
# launch, per request, per decode or draft token, per ctx/1000, per prompt-chunk token (cheaper: many rows at
# once), per request verifying draft tokens (its first one dearer than the rest)
TRUE_VERIFY = np.array([0.004, 0.0006, 0.0009, 0.0005, 0.0003, 0.0])


def synthetic_records(n=400, seed=0, noise=0.0, draft=TRUE_DRAFT, verify=TRUE_VERIFY):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        b = rng.randint(1, 32)
        k = rng.choice([0, 1, 2, 3, 5, 8])
        ctx = rng.randint(20, 600)
        chunk = rng.choice([0, 0, 0, 64, 512])  # a prompt chunk sharing the forward
        r = StepRecord(batch_size=b + (chunk > 0), num_decode=b, num_draft_reqs=b if k else 0, draft_tokens=b * k,
                       verify_tokens=b * (k + 1) + chunk, prefill_tokens=chunk, context_tokens=b * ctx, max_context=ctx + k,
                       max_k=k, num_accepted=0,
                       draft_time=0.0, verify_time=0.0, draft_compute_time=0.0,
                       verify_compute_time=0.0, step_time=0.0,
                       draft_catchup_tokens=rng.choice([0, 0, 0, 40, 300]) if k else 0)
        d, v = record_features(r)
        r.draft_time = float(np.dot(draft, d)) * (1 + rng.gauss(0, noise))
        r.verify_time = float(np.dot(verify, v)) * (1 + rng.gauss(0, noise))
        out.append(r)
    return out


def fitted(draft=TRUE_DRAFT, verify=TRUE_VERIFY) -> StepTimeModel:
    m = StepTimeModel()
    m.fit(synthetic_records(draft=draft, verify=verify))
    return m


def test_step_time_model_recovers_known_coefficients():
    m = fitted()
    np.testing.assert_allclose(m.draft.coef, TRUE_DRAFT, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(m.verify.coef, TRUE_VERIFY, rtol=1e-3, atol=1e-7)


def test_a_requests_first_draft_token_is_priced_apart_from_its_later_ones():
    """A target whose first verified draft token of a request costs more than each later one (at
    batch 24 on an AVX2 CPU, 2 / 3 / 4 tokens a sequence cost 1.54x / 1.80x / 2.07x a decode):
    the fit recovers the premium, and prices a k = 1 step dearer than a line through k = 0..8
    would (what one price per verified token did, making k = 1 look the cheapest k)."""
    premium = TRUE_VERIFY + np.array([0, 0, 0, 0, 0, 0.003])
    m = fitted(verify=premium)
    np.testing.assert_allclose(m.verify.coef, premium, rtol=1e-3, atol=1e-7)
    k0, k1, k3 = (m.predict_step_time([k] * 24, [300] * 24) for k in (0, 1, 3))
    assert k1 - k0 > 1.5 * (k3 - k1) / 2  # the first token of each request: dearer than the next two's mean


def test_step_time_model_predicts_noisy_held_out_records():
    m = StepTimeModel()
    m.fit(synthetic_records(noise=0.05, seed=1))
    assert mape(m, synthetic_records(noise=0.05, seed=2, n=200)) < 0.06


def test_recent_steps_weigh_more_so_the_model_follows_a_slower_machine():
    m = StepTimeModel(half_life=50)
    old = synthetic_records(n=300, seed=3)
    slow = synthetic_records(n=300, seed=4, verify=TRUE_VERIFY * 2, draft=TRUE_DRAFT * 2)
    m.fit(old + slow)
    assert mape(m, synthetic_records(n=100, seed=5, verify=TRUE_VERIFY * 2, draft=TRUE_DRAFT * 2)) < 0.1


def test_a_refit_over_a_moving_window_equals_a_fresh_fit():
    """Refits reuse each record's features (made once per record): over a window that moved on
    (records dropped, new ones added, new objects with the same values in the sweep) a refit
    must give what a fresh model fitted on the same records gives."""
    first = synthetic_records(n=300, seed=6, noise=0.05)
    later = synthetic_records(n=300, seed=7, noise=0.05, verify=TRUE_VERIFY * 1.5, draft=TRUE_DRAFT * 1.5)
    sweep = synthetic_records(n=60, seed=8)
    reused = StepTimeModel(half_life=50)
    reused.fit(first, prior=sweep)
    reused.fit(first[200:] + later, prior=synthetic_records(n=60, seed=8))
    fresh = StepTimeModel(half_life=50)
    fresh.fit(first[200:] + later, prior=sweep)
    np.testing.assert_array_equal(reused.draft.coef, fresh.draft.coef)
    np.testing.assert_array_equal(reused.verify.coef, fresh.verify.coef)
    assert not np.allclose(reused.verify.coef, fitted().verify.coef, rtol=0.05)  # the window did move


def test_the_sweeps_weight_fades_as_live_steps_come_in():
    """A start-up sweep that priced a verified token at half what live steps pay: once live
    steps are many, the fit follows them (the sweep gives the shape only before traffic)."""
    sweep_verify = TRUE_VERIFY * np.array([1, 1, 0.5, 1, 1, 1])
    sweep = synthetic_records(n=120, seed=8, verify=sweep_verify)
    m = StepTimeModel()
    m.fit([], prior=sweep)
    assert m.verify.coef[2] == pytest.approx(sweep_verify[2], rel=1e-3)
    m.fit(synthetic_records(n=400, seed=9), prior=sweep)
    assert m.verify.coef[2] == pytest.approx(TRUE_VERIFY[2], rel=0.05)


def test_around_a_batch_size_the_fit_follows_the_steps_near_it():
    """A target whose verified token is almost free at small batches (memory-bound) and costly
    at large ones: one line through both is wrong at both ends; around a batch size it is not."""
    light = synthetic_records(n=300, seed=10, verify=TRUE_VERIFY * np.array([1, 1, 0.1, 1, 1, 1]))
    heavy = synthetic_records(n=300, seed=11, verify=TRUE_VERIFY * np.array([1, 1, 2.0, 1, 1, 1]))
    records = [r for r in light if r.batch_size <= 4] + [r for r in heavy if r.batch_size >= 16]
    whole, near_1, near_24 = StepTimeModel(), StepTimeModel(), StepTimeModel()
    whole.fit(records)
    near_1.fit(records, around=1)
    near_24.fit(records, around=24)
    assert near_1.verify.coef[2] == pytest.approx(0.1 * TRUE_VERIFY[2], rel=0.2)
    assert near_24.verify.coef[2] == pytest.approx(2.0 * TRUE_VERIFY[2], rel=0.2)
    # The whole fit is wrong at both ends (compared by prediction error, not by a coefficient: it
    # may spread the difference over its per-token and per-speculating-request terms).
    small = [r for r in light if r.batch_size <= 2]
    large = [r for r in heavy if r.batch_size >= 20]
    assert mape(near_1, small) < mape(whole, small) / 4 and mape(near_24, large) < mape(whole, large) / 4
