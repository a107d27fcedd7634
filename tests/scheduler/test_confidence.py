"""Adaptive verification: calibrating draft confidence and choosing how much to verify."""

from __future__ import annotations

import numpy as np

from goodspec.scheduler.confidence import ConfidenceCalibrator, VerifyShape, verify_lengths
from goodspec.scheduler.step_time import StepTimeModel


def _model(per_token: float, base: float = 0.02) -> StepTimeModel:
    m = StepTimeModel()
    m.verify.coef = np.array([base, 0.0, per_token, 0.0, 0.0, 0.0])
    m.num_fitted = 1
    return m


SHAPE = VerifyShape(num_items=4, tokens=4, emitting=4, longest=100, draft_time=0.005)


def test_the_calibrator_learns_what_a_confidence_is_worth_per_sampling_mode():
    rng = np.random.default_rng(0)
    cal = ConfidenceCalibrator()
    for _ in range(3000):  # a draft that is overconfident when it says 0.95, honest at 0.15
        conf = rng.choice([0.15, 0.95], size=4)
        accepted = 0
        for c in conf:
            if rng.random() < (0.6 if c > 0.5 else 0.15):
                accepted += 1
            else:
                break
        cal.observe(list(conf), accepted, greedy=True)
    rates = cal.rates(greedy=True)
    assert abs(rates[19] - 0.6) < 0.05 and abs(rates[3] - 0.15) < 0.05
    assert np.allclose(cal.survival([0.95, 0.95, 0.15], greedy=True),
                       np.cumprod([rates[19], rates[19], rates[3]]))
    # Sampled requests learn apart: untouched, their rates are the prior (the draft's word).
    assert abs(cal.rates(greedy=False)[19] - 0.975) < 1e-9


def test_positions_after_the_first_rejection_are_not_counted():
    cal = ConfidenceCalibrator(prior=0.0)
    cal.observe([0.55, 0.55, 0.05, 0.05], accepted=1, greedy=True)
    accepted, trials = cal._counts[0]
    assert trials[11] == 2 and accepted[11] == 1 and trials[1] == 0


def test_greedy_proposals_are_cut_where_a_slot_no_longer_pays_for_its_verify_time():
    survival = [np.array([0.9, 0.8, 0.3, 0.05]), np.array([0.5, 0.1]), np.array([0.95, 0.9, 0.85])]
    greedy = [True] * 3
    free, _ = verify_lengths(survival, greedy, SHAPE, _model(per_token=1e-7), None)
    assert free == [4, 2, 3]  # verifying costs nothing more: every slot
    costly, level = verify_lengths(survival, greedy, SHAPE, _model(per_token=2e-3), None)
    assert costly == [2, 1, 3]  # the low-survival tails go
    # The chosen B is the best of all cuts by expected tokens per second.
    def ratio(ls):
        gain = SHAPE.emitting + sum(s[:n].sum() for s, n in zip(survival, ls))
        return gain / (SHAPE.draft_time + 0.02 + 2e-3 * (SHAPE.tokens + sum(ls)))
    assert abs(level - ratio(costly)) < 1e-9
    assert ratio(costly) >= max(ratio([a, b, c]) for a in range(5) for b in range(3) for c in range(4)) - 1e-12
    assert verify_lengths(survival, greedy, SHAPE, _model(per_token=1.0), None)[0] == [0, 0, 0]


def test_a_sampled_proposal_is_cut_by_a_rule_fixed_before_its_tokens_are_seen():
    """Position j is verified iff its survival clears the previous step's level: changing what
    lies after position j never changes whether j is verified (a stopping rule)."""
    model = _model(per_token=1e-3)
    level = 200.0  # tokens per second: a slot must be worth 0.2 tokens
    a, _ = verify_lengths([np.array([0.9, 0.5, 0.25, 0.1])], [False], SHAPE, model, level)
    b, _ = verify_lengths([np.array([0.9, 0.5, 0.19, 0.18])], [False], SHAPE, model, level)
    assert a == [3] and b == [2]
    c, _ = verify_lengths([np.array([0.9, 0.5, 0.25, 0.24])], [False], SHAPE, model, level)
    assert c == [4]
    assert verify_lengths([np.array([0.9, 0.05])], [False], SHAPE, model, None)[0] == [2]  # no level yet


def test_goodput_conf_lets_the_draft_go_past_k_and_prices_a_position_in_tokens():
    """The same choices as goodput, each drafted request allowed DRAFT_AHEAD more positions, and
    a DraftStop built from the calibrator and the step-time model; plain goodput, and
    goodput-conf told not to stop drafting, send none."""
    from goodspec.scheduler.policy import GoodputPolicy
    from goodspec.scheduler.request import Request
    from goodspec.workers.sampling import SamplingParams
    from tests.scheduler.test_step_time import synthetic_records

    plain, conf = GoodputPolicy(), GoodputPolicy(confidence=True)
    cut_only = GoodputPolicy(confidence=True, stop_drafting=False)
    sampling = SamplingParams(max_new_tokens=1000, seed=1)
    reqs = [Request(f"r{i}", [5] * (100 + 50 * i), sampling) for i in range(4)]
    for r in reqs:
        r.target_len = r.draft_len = len(r.token_ids) - 1
    for p in (plain, conf, cut_only):
        p.seed(synthetic_records(seed=1))
        for record in synthetic_records(n=20, seed=2):  # past the warm-up: acceptance 2 of 3
            p.choose(reqs, [3] * 4)
            p.observe([(r.req_id, 3, 2) for r in reqs], record)
    conf.calibrator.observe([0.9, 0.8, 0.3], 2, True)
    caps = [8, 8, 8, 4]
    ks = plain.choose(reqs, caps)
    assert plain.draft_stop() is None and any(ks)
    assert cut_only.choose(reqs, caps) == ks and cut_only.draft_stop() is None  # verification cut alone
    assert conf.choose(reqs, caps) == [min(c, k + GoodputPolicy.DRAFT_AHEAD) if k else 0 for k, c in zip(ks, caps)]
    stop = conf.draft_stop()
    cal = conf.calibrator
    assert stop.rates == (tuple(cal.rates(True).tolist()), tuple(cal.rates(False).tolist()))
    assert stop.next_rate == (cal.mean_rate(True), cal.mean_rate(False))
    cd, cv = conf.time_model.draft.coef, conf.time_model.verify.coef
    row_s = cv[2] + cd[2] + cd[3] * 250 / 1000.0  # the longest context is 250
    assert stop.row_cost > 0 and stop.pass_cost > 0
    assert np.isclose(stop.pass_cost / stop.row_cost, cd[1] / row_s)
    # In tokens: the step's goodput level (tokens per second) times seconds, a few per cent of
    # a token for a row's position on this synthetic machine.
    assert 0.0 < stop.row_cost < 1.0


def test_the_verification_cut_prices_the_decodes_alone_beside_a_prompt_chunk():
    """As goodput's choice of k does: a prompt chunk in the same forward changes nothing in the
    shape a policy cuts by (beside its fixed cost any verified token would look cheap)."""
    from goodspec.scheduler.plan import StepPlan
    from goodspec.scheduler.policy import OffPolicy
    from goodspec.scheduler.policy_book import PolicyBook
    from goodspec.scheduler.request import Request
    from goodspec.workers.messages import Proposal, VerifyItem
    from goodspec.workers.sampling import SamplingParams

    class Recording(OffPolicy):  # a policy that keeps what it was asked to cut by
        def trim(self, requests, draft_conf, shape):
            self.shape = shape
            return [1] * len(requests)

    greedy = SamplingParams(max_new_tokens=100)

    def plan_with(chunk: bool) -> tuple[StepPlan, Recording]:
        policy, plan = Recording(), StepPlan()
        for i in range(2):
            r = Request(f"d{i}", [5] * 50, greedy, policy=policy)
            plan.verify.append(VerifyItem(r.req_id, 60 + i, [7], True, greedy, [8, 9, 10], proposal_row=i))
            plan.verify_reqs.append(r)
            plan.ks[r.req_id] = 3
        if chunk:
            r = Request("p", [5] * 900, greedy, policy=policy)
            plan.verify.append(VerifyItem("p", 0, [5] * 512, False, greedy))
            plan.verify_reqs.append(r)
        PolicyBook(OffPolicy()).trim(plan, Proposal([[8, 9, 10]] * 2, None, draft_conf=[[0.9] * 3] * 2), 0.004)
        return plan, policy

    alone, with_chunk = plan_with(False), plan_with(True)
    assert with_chunk[1].shape == alone[1].shape == VerifyShape(num_items=2, tokens=2, emitting=2,
                                                                longest=62, draft_time=0.004)
    assert [it.draft_ids for it in with_chunk[0].verify[:2]] == [[8]] * 2  # the cut was applied
