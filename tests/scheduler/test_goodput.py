"""The goodput model: the acceptance estimate and the choice of k (the step-time fit: test_step_time)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from goodspec.scheduler.goodput import AcceptanceEstimator, best_choice, best_ks, expected_tokens
from goodspec.scheduler.step_record import StepRecord
from goodspec.scheduler.step_time import record_features
from tests.scheduler.test_step_time import TRUE_DRAFT, TRUE_VERIFY, fitted, synthetic_records

def test_expected_tokens_counts_the_bonus_token():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens(1.0, 4) == 5.0


def test_acceptance_estimate_starts_from_global_and_follows_the_request():
    est = AcceptanceEstimator()
    for _ in range(50):
        est.observe("good", 4, 4)
        est.observe("bad", 4, 0)
    assert est.alpha("good") > 0.9 and est.alpha("bad") < 0.25
    assert 0.3 < est.alpha("new") < 0.9  # a new request starts near the running global rate


def finish_requests(est: AcceptanceEstimator, alphas, rng, steps: int = 30, k: int = 4) -> None:
    for i, a in enumerate(alphas):
        for _ in range(steps):
            accepted = 0
            while accepted < k and rng.random() < a:
                accepted += 1
            est.observe(f"r{i}", k, accepted)
        est.forget(f"r{i}")


def test_prior_weight_is_learned_from_how_much_requests_differ():
    rng = np.random.default_rng(0)
    alike = AcceptanceEstimator()
    finish_requests(alike, [0.8] * 40, rng)
    apart = AcceptanceEstimator()
    finish_requests(apart, [0.95, 0.3] * 20, rng)
    # Requests that differ only by chance: one unlucky step must barely move a new estimate.
    assert alike.prior_weight >= 20
    # Requests that really differ: their own evidence must count after a step or two.
    assert apart.prior_weight <= 3
    for est in (alike, apart):
        est.observe("new", 4, 0)
    assert alike.alpha("new") > 0.95 * alike.global_alpha
    assert apart.alpha("new") < 0.8 * apart.global_alpha


def ks_for(alpha, batch, model, cap=8, ctx=200):
    return best_ks([alpha] * batch, [ctx] * batch, [cap] * batch, model)


def test_high_acceptance_at_light_load_speculates_deeply():
    assert min(ks_for(0.9, 1, fitted())) >= 4


def test_low_acceptance_speculates_nothing():
    assert ks_for(0.05, 1, fitted()) == [0]
    assert ks_for(0.05, 16, fitted()) == [0] * 16


def test_same_acceptance_at_heavy_load_speculates_less():
    light = np.mean(ks_for(0.7, 1, fitted()))
    heavy = np.mean(ks_for(0.7, 32, fitted()))
    assert heavy < light


def test_k_is_monotone_in_acceptance_and_in_load():
    m = fitted()
    by_alpha = [np.mean(ks_for(a, 8, m)) for a in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert by_alpha == sorted(by_alpha)
    by_load = [np.mean(ks_for(0.7, b, m)) for b in (1, 2, 4, 8, 16, 32)]
    assert by_load == sorted(by_load, reverse=True)


def test_mixed_batch_gives_more_to_requests_that_accept_more():
    ks = best_ks([0.9, 0.2, 0.6], [200] * 3, [8] * 3, fitted())
    assert ks[0] >= ks[2] >= ks[1]


def test_a_request_whose_draft_fell_behind_is_not_restarted_for_one_token():
    """Restarting speculation for a request makes the draft process every token it missed;
    with a long backlog that costs more than one step of drafts can win back."""
    ks = best_ks([0.9, 0.9], [300, 300], [4, 4], fitted(), catchups=[0, 2000])
    assert ks[0] > 0 and ks[1] == 0


def test_caps_are_respected():
    assert all(k <= c for k, c in zip(best_ks([0.95] * 3, [100] * 3, [0, 2, 8], fitted()), [0, 2, 8]))


def test_greedy_is_close_to_brute_force_on_small_batches():
    m = fitted()
    rng = random.Random(0)
    import itertools

    for _ in range(20):
        alphas = [rng.uniform(0.1, 0.95) for _ in range(3)]
        ctx = [rng.randint(50, 500) for _ in range(3)]

        def g(ks):
            return sum(expected_tokens(a, k) for a, k in zip(alphas, ks)) / m.predict_step_time(ks, ctx)

        brute = max(g(ks) for ks in itertools.product(range(6), repeat=3))
        assert g(best_ks(alphas, ctx, [5] * 3, m)) >= 0.97 * brute


def test_no_speculation_exactly_when_no_choice_clears_the_margin():
    """best_choice answers "none" early when no single option earns its own cost at the level to
    clear; that must be the search's answer too: none exactly when brute force over every k finds
    no choice whose goodput beats no speculation's by the margin."""
    import itertools

    m = fitted()
    rng = random.Random(2)
    nones = 0
    for _ in range(200):
        n = rng.randint(1, 3)
        alphas = [rng.uniform(0.05, 0.9) for _ in range(n)]
        ctx = [rng.randint(50, 2000) for _ in range(n)]
        margin = rng.choice([0.0, 0.02, 0.1, 0.2, 0.5])

        def g(ks):
            return sum(expected_tokens(a, k) for a, k in zip(alphas, ks)) / m.predict_step_time(ks, ctx)

        clears = max(g(ks) for ks in itertools.product(range(4), repeat=n)) > g([0] * n) * (1 + margin) * (1 + 1e-9)
        ks = best_choice(alphas, ctx, [3] * n, m, margin=margin).ks
        assert any(ks) == clears, (alphas, ctx, margin, ks)
        nones += not clears
    assert 20 < nones < 180  # both answers were tested


def test_a_lone_request_gets_the_best_of_every_option_by_the_step_time_model():
    """Batch 1 (light load) prices every option at once: the choice must be the brute-force
    best of k = 0..cap from the draft model or from prompt lookup, by predict_step_time (which
    best_choice does not use), with a catch-up to pay before drafting."""
    from goodspec.scheduler.goodput import best_choice

    m = fitted()
    rng = random.Random(1)
    for _ in range(30):
        cap, ctx, catchup = rng.randint(1, 8), [rng.randint(50, 500)], [rng.choice([0, 0, 40, 300])]
        draft_gains = np.cumsum([1.0] + [rng.uniform(0.0, 0.95) ** j for j in range(1, cap + 1)])
        lookup_gains = np.cumsum([1.0] + [rng.uniform(0.0, 0.95) ** j for j in range(1, cap + 1)])

        def g(k, lookup):
            gains = lookup_gains if lookup else draft_gains
            return gains[k] / m.predict_step_time([k], ctx, catchup, [lookup])

        choice = best_choice(None, ctx, [cap], m, catchup, draft_gains[None], lookup_gains=lookup_gains[None])
        brute = max(g(k, lookup) for k in range(cap + 1) for lookup in (False, True))
        assert g(choice.ks[0], choice.lookup[0]) == pytest.approx(brute, rel=1e-9)


def test_expected_tokens_follow_the_measured_acceptance_at_each_draft_position():
    """A proposer whose first token is a coin flip but which runs on once it matches (prompt
    lookup): a single pooled rate would value its deep tokens at a fraction of their worth."""
    rng = np.random.default_rng(1)
    est = AcceptanceEstimator()
    for step in range(3000):
        accepted = 0
        while accepted < 8 and rng.random() < (0.5 if accepted == 0 else 0.9):
            accepted += 1
        est.observe(f"r{step % 30}", 8, accepted)
    rates = est.depth_rates(8)
    assert abs(rates[0] - 0.5) < 0.05 and np.all(np.abs(rates[1:] - 0.9) < 0.05)
    gains = est.expected_tokens(["new"], 8)[0]
    assert gains[0] == 1.0
    want = 1.0 + np.cumsum(0.5 * 0.9 ** np.arange(8))
    assert np.allclose(gains[1:], want, rtol=0.08)
    pooled = est.global_alpha  # what the geometric model would use at every position
    assert gains[8] - gains[7] > 1.4 * pooled ** 8  # true 0.24 vs 0.14


def test_a_request_tried_only_shallow_is_compared_at_the_same_positions():
    """Acceptance 0.5 at the first position and 0.9 after: a request that has only been given
    k = 1 and accepts half its tokens is exactly average, not worse than the global mix."""
    rng = np.random.default_rng(2)
    est = AcceptanceEstimator()

    def verify(req_id, k):
        accepted = 0
        while accepted < k and rng.random() < (0.5 if accepted == 0 else 0.9):
            accepted += 1
        est.observe(req_id, k, accepted)

    for step in range(2000):
        verify(f"deep{step % 20}", 8)
    for _ in range(60):
        verify("shallow", 1)
    assert est.alpha("shallow") < 0.8 * est.global_alpha  # its pooled rate looks poor...
    assert 0.8 < est.scale("shallow") < 1.2  # ...but at the positions it was tried it is average


def test_the_batch_uniform_variant_gives_everyone_one_k_and_never_predicts_more_goodput():
    """SmartSpec's choice (one k for the batch), kept for the A/B: on a batch whose requests
    accept differently, per-request k is at least as good by the same model."""
    from goodspec.scheduler.goodput import expected_tokens

    model, alphas, ctx = fitted(), [0.9, 0.2, 0.6, 0.85], [200] * 4
    caps = [8, 8, 3, 8]
    uniform = best_ks(alphas, ctx, caps, model, uniform=True)
    per_request = best_ks(alphas, ctx, caps, model)
    m = max(uniform)
    assert uniform == [min(m, c) for c in caps]  # one k, cut only by a request's own cap

    def goodput(ks):
        gained = sum(expected_tokens(a, k) for a, k in zip(alphas, ks))
        return gained / model.predict_step_time(ks, ctx)

    assert goodput(per_request) >= goodput(uniform) * (1 - 1e-9)
    assert per_request != uniform  # the low-acceptance request is treated differently


def closed_loop(policy, batches: list[int], acceptance: float, verify_of, seed: int) -> list[list[int]]:
    """`policy` chooses k for each step of a simulated machine: batches[i] requests of 200
    tokens decode at step i, each draft token is accepted with `acceptance` (until the first
    rejection), and the step takes TRUE_DRAFT's draft time and verify_of(batch)'s verify time.
    Returns the ks chosen at each step."""
    from goodspec.scheduler.request import Request
    from goodspec.workers.sampling import SamplingParams

    rng = random.Random(seed)
    sampling = SamplingParams(max_new_tokens=100_000, seed=1)
    chosen = []
    for n in batches:
        reqs = [Request(f"r{i}", [5] * 200, sampling) for i in range(n)]
        for r in reqs:
            r.target_len = r.draft_len = len(r.token_ids) - 1
        ks = policy.choose(reqs, [8] * n)
        chosen.append(ks)
        accepted = []
        for k in ks:
            a = 0
            while a < k and rng.random() < acceptance:
                a += 1
            accepted.append(a)
        record = StepRecord(batch_size=n, num_decode=n, num_draft_reqs=sum(k > 0 for k in ks),
                            draft_tokens=sum(ks), verify_tokens=n + sum(ks), context_tokens=200 * n,
                            max_context=200 + max(ks), max_k=max(ks), num_accepted=sum(accepted),
                            draft_time=0.0, verify_time=0.0, draft_compute_time=0.0,
                            verify_compute_time=0.0, step_time=0.0, ks=list(ks))
        d, v = record_features(record)
        record.draft_time, record.verify_time = float(np.dot(TRUE_DRAFT, d)), float(np.dot(verify_of(n), v))
        policy.observe([(r.req_id, k, a) for r, k, a in zip(reqs, ks, accepted)], record)
    return chosen


def test_after_the_load_jumps_8x_the_chosen_k_settles_within_20_steps():
    """A closed loop on a simulated machine whose verify pass has a large fixed cost (as on a
    GPU, where speculation pays at light load) and acceptance 0.8: 2 requests decode for 100
    steps, then 16 (the request rate jumped 8x). Within 20 steps of the jump the mean k must be
    near the level it settles at, well below the light-load level. A new policy speculates from
    its first step (it measures acceptance before trusting its estimate)."""
    from goodspec.scheduler.policy import GoodputPolicy

    verify = np.array([0.02, 0.0006, 0.001, 0.0005, 0.0003, 0.0])  # launch, per request, per token, per ctx/1000, per prompt token, per speculating request
    policy = GoodputPolicy()
    policy.seed(synthetic_records(seed=1, verify=verify))
    chosen = closed_loop(policy, [2] * 100 + [16] * 100, 0.8, lambda n: verify, seed=5)
    mean_k = [sum(ks) / len(ks) for ks in chosen]
    assert min(mean_k[:100]) >= 2, mean_k[:20]  # no cold start at k = 0
    light, settled = np.mean(mean_k[70:100]), np.mean(mean_k[160:200])
    assert light - settled >= 2.0, (light, settled)  # the load matters: a real change to react to
    assert all(abs(k - settled) <= 0.75 for k in mean_k[120:200]), (settled, mean_k[100:140])


def test_exploration_measures_with_one_request_whose_draft_is_furthest_along():
    from goodspec.scheduler.policy import GoodputPolicy

    assert GoodputPolicy._explore([400, 3, 0, 0], [2, 2, 0, 2]) == [0, 0, 0, 1]
    assert GoodputPolicy._explore([5, 3], [0, 0]) == [0, 0]


def test_a_steps_outcomes_at_once_learn_what_one_at_a_time_would_in_any_order():
    """observe_many (the policy's per-step call) against the same outcomes one by one: the
    global rates and each request's scale agree, and the order of a step's requests is moot."""
    rng = random.Random(3)
    steps = [[(f"r{i}", k, rng.randint(0, k)) for i, k in enumerate(rng.choice([0, 1, 3, 8]) for _ in range(32))]
             for _ in range(200)]
    at_once, reversed_, singly = AcceptanceEstimator(), AcceptanceEstimator(), AcceptanceEstimator()
    for outcomes in steps:
        at_once.observe_many(outcomes)
        reversed_.observe_many(outcomes[::-1])
        for o in outcomes:
            singly.observe(*o)
    ids = [f"r{i}" for i in range(32)]
    assert np.array_equal(at_once.depth_rates(8), reversed_.depth_rates(8))
    assert np.array_equal(at_once.scales(ids), reversed_.scales(ids))
    assert np.allclose(at_once.depth_rates(8), singly.depth_rates(8), rtol=2e-3)
    assert np.allclose(at_once.scales(ids), singly.scales(ids), rtol=5e-3)  # one at a time, each
    # request after the first in a step was compared with rates its step-mates had just moved
    assert at_once.global_alpha == pytest.approx(singly.global_alpha, rel=1e-3)


def _batch_choice(model, alpha, batch, **kw):
    from goodspec.scheduler.goodput import best_choice

    return best_choice([alpha] * batch, [200] * batch, [4] * batch, model, **kw)


def _predicted_gain(model, ks, batch, alpha):
    """Predicted goodput of ks over no speculation, at context 200."""
    tokens = sum(sum(alpha ** j for j in range(k + 1)) for k in ks)
    return (tokens / model.predict_step_time(ks, [200] * batch)) / (batch / model.predict_step_time([0] * batch, [200] * batch))


def test_no_speculation_unless_its_predicted_gain_clears_the_margin():
    m = fitted()
    for batch in (1, 8, 32):
        free = _batch_choice(m, 0.8, batch).ks
        assert any(free), batch
        gain = _predicted_gain(m, free, batch, 0.8) - 1
        assert gain > 0
        assert _batch_choice(m, 0.8, batch, margin=gain * 0.9).ks == free  # a smaller margin: the same choice
        assert not any(_batch_choice(m, 0.8, batch, margin=gain * 1.1).ks)  # a larger one: none


def test_a_batch_that_jumps_is_priced_by_a_fit_around_its_own_size_from_its_first_step():
    """A target with a fixed cost per forward whose verified token is nearly free at small
    batches and dear at large ones (as on a CPU), acceptance 0.6: 2 requests decode for 60 steps
    (speculating), then 24 arrive at once.
    The model was last fitted around batch 2, where a draft token costs almost nothing; priced
    by that fit, the first steps of the burst speculated for all 24 (six steps on the real pair,
    until the next periodic refit). Refitted around the new batch first, the very first step of
    the burst does not speculate."""
    from goodspec.scheduler.policy import GoodputPolicy

    cheap = TRUE_VERIFY * np.array([5, 1, 0.1, 1, 1, 1])  # 20 ms a forward; a verified token: a tenth
    dear = TRUE_VERIFY * np.array([5, 1, 4.0, 1, 1, 1])  # ... four times
    sweep = [r for r in synthetic_records(n=300, seed=10, verify=cheap) if r.batch_size <= 4] + \
            [r for r in synthetic_records(n=300, seed=11, verify=dear) if r.batch_size >= 16]
    policy = GoodputPolicy()
    policy.seed(sweep)
    chosen = closed_loop(policy, [2] * 60 + [24], 0.6, lambda n: cheap if n <= 4 else dear, seed=3)
    assert min(sum(ks) / 2 for ks in chosen[40:60]) >= 2  # light load: speculation
    assert chosen[60] == [0] * 24
