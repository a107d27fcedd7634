"""What a draft's catch-up is charged to the step that pays it (goodspec.scheduler.catchup)."""

from __future__ import annotations

import pytest

from goodspec.scheduler.catchup import CatchUpPricing


def test_at_first_a_catch_up_is_spread_over_every_remaining_step_as_speculative():
    pricing = CatchUpPricing()
    assert pricing.share == 1.0
    # 48 tokens left at 2 tokens a speculative step: 24 steps share 300 tokens of catch-up
    assert pricing.spread([300, 0], [48, 48], [2.0, 2.0]) == [pytest.approx(12.5), 0.0]


def test_when_caught_up_requests_stop_speculating_a_catch_up_is_charged_whole():
    pricing = CatchUpPricing()
    for _ in range(20):  # 16 caught-up requests a step, none speculating
        pricing.count([0] * 16, [4] * 16, [0] * 16, [False] * 16)
    assert pricing.share < 0.01
    assert pricing.spread([300], [48], [2.0]) == [300.0]
    # half of them speculating: half the steps left are speculative ones
    for _ in range(100):
        pricing.count([0] * 16, [4] * 16, [2] * 8 + [0] * 8, [False] * 16)
    assert pricing.share == pytest.approx(0.5, abs=0.01)
    assert pricing.spread([300], [48], [2.0])[0] == pytest.approx(300 / (0.5 * 48 / 1.5), rel=0.03)


def test_only_caught_up_requests_that_could_speculate_count_and_lookup_is_not_the_draft():
    pricing = CatchUpPricing()
    pricing.count([5, 40], [4, 4], [3, 3], [False, False])  # behind: not counted
    pricing.count([0], [0], [0], [False])  # no room to speculate: not counted
    assert (pricing.seen, pricing.speculated) == (1.0, 1.0)
    pricing.count([1, 0], [4, 4], [3, 3], [False, True])  # the second's tokens came from lookup
    assert (pricing.seen, pricing.speculated) == (pytest.approx(2.95), pytest.approx(1.95))


def test_the_goodput_policy_charges_a_new_prompt_whole_once_caught_up_requests_stop_speculating():
    """A caught-up request and a new one with a 2000-token prompt, both accepting 90%: spread
    over the new request's 200 tokens as if it would speculate at every step, its catch-up is
    worth paying; once caught-up requests have stopped speculating (as at saturation), it is
    not (the whole of it costs more than a step of drafts wins back)."""
    from goodspec.scheduler.policy import GoodputPolicy
    from goodspec.scheduler.request import Request
    from goodspec.workers.sampling import SamplingParams
    from tests.scheduler.test_step_time import synthetic_records

    def batch():
        sampling = SamplingParams(max_new_tokens=200, seed=1)
        caught, new = Request("caught", [5] * 300, sampling), Request("new", [5] * 2000, sampling)
        caught.target_len = caught.draft_len = 299
        new.target_len, new.draft_len = 1999, 0
        return [caught, new]

    def policy():
        p = GoodputPolicy()
        p.seed(synthetic_records(seed=1))
        p._observations = p.min_observations  # as after its first speculative steps
        p.acceptance.global_success, p.acceptance.global_failure = 90.0, 10.0
        return p

    fresh = policy()
    assert all(fresh.choose(batch(), [4, 4]))
    stopped = policy()
    for _ in range(20):
        stopped.catchup.count([0] * 16, [4] * 16, [0] * 16, [False] * 16)
    ks = stopped.choose(batch(), [4, 4])
    assert ks[0] > 0 and ks[1] == 0
