"""The goodput policy on the shipped pair, in process: lossless, predictive, load-aware."""

from __future__ import annotations

import statistics

import pytest

from goodspec.engine import LLMEngine
from goodspec.workers.sampling import SamplingParams
from tests.conftest import engine_config
from tests.test_engine import _run_staggered


@pytest.fixture(scope="module")
def goodput_engine():
    return LLMEngine(engine_config("goodput"))


@pytest.mark.parametrize("proposer", ["draft", "ngram", "draft, goodput-conf"])
def test_greedy_output_under_goodput_equals_target_only(proposer, goodput_engine, sharegpt_prompts,
                                                        greedy_reference):
    engine = {"draft": lambda: goodput_engine,
              "ngram": lambda: LLMEngine(engine_config("goodput", proposer="ngram")),
              "draft, goodput-conf": lambda: LLMEngine(engine_config("goodput-conf"))}[proposer]()
    prompts = sharegpt_prompts[:20]
    got = _run_staggered(engine, prompts, greedy_reference, None)
    for p in prompts:
        assert got[p] == greedy_reference[p][1]
    records = engine.scheduler.step_records
    assert any(r.draft_tokens for r in records), "goodput never speculated"
    if proposer.endswith("goodput-conf"):  # adaptive verification cut some proposals
        assert any(r.draft_tokens > sum(r.ks) for r in records)


def test_step_time_model_predicts_held_out_real_steps_within_15_percent(goodput_engine, sharegpt_prompts):
    """Real steps of the shipped pair (a goodput-scheduled ShareGPT workload): fitted on the
    start-up sweep and every other live step, it predicts the steps it did not see."""
    from goodspec.scheduler.goodput import StepTimeModel, mape

    engine = goodput_engine
    policy = engine.scheduler.policy
    start = len(engine.scheduler.step_records)
    policy.prediction_log.clear()
    engine.generate(sharegpt_prompts[:24], SamplingParams(max_new_tokens=96, ignore_eos=True))
    live = [r for r in engine.scheduler.step_records[start:] if r.num_decode == r.batch_size]
    assert len(live) >= 40
    model = StepTimeModel()
    model.fit(live[0::2], prior=engine.scheduler.policies.profile_records)
    held_out = mape(model, live[1::2])
    online = statistics.mean(abs(p - m) / m for p, m in policy.prediction_log)
    print(f"\nheld-out step-time MAPE {held_out:.3f} over {len(live[1::2])} steps; "
          f"online pre-step MAPE {online:.3f} over {len(policy.prediction_log)} steps")
    assert held_out < 0.15


def test_mean_k_falls_as_load_rises(goodput_engine, sharegpt_prompts):
    engine = goodput_engine
    sched = engine.scheduler

    def mean_k(concurrency: int) -> float:
        start = len(sched.step_records)
        prompts = sharegpt_prompts[:concurrency]
        engine.generate(prompts, SamplingParams(max_new_tokens=32, ignore_eos=True))
        ks = [k for r in sched.step_records[start:] if r.num_decode == r.batch_size for k in r.ks]
        return statistics.mean(ks)

    light, heavy = mean_k(1), mean_k(32)
    print(f"\nmean k: light load {light:.2f}, heavy load {heavy:.2f}")
    assert heavy < light


def test_per_request_policy_override_still_applies(goodput_engine, sharegpt_prompts):
    rid = goodput_engine.add_request(sharegpt_prompts[0], SamplingParams(max_new_tokens=12), policy="off")
    while goodput_engine.has_unfinished():
        goodput_engine.step()
    assert goodput_engine.take_completion(rid).usage.draft_tokens_proposed == 0
