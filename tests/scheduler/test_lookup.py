"""Prompt lookup in the scheduler: the incremental index proposes what the worker-side scan
proposes, scoring is the outcome verification would have had, and the choice between the draft
model and lookup goes where the goodput is."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from goodspec.scheduler.goodput import best_choice
from goodspec.scheduler.lookup import LookupIndex, matched_prefix
from goodspec.scheduler.proposers import Proposers
from goodspec.scheduler.step_time import StepTimeModel
from goodspec.workers.messages import Proposal


def scan(ctx: list[int], k: int, max_n: int = 4) -> list[int]:
    """Prompt lookup by its definition, for reference: the longest n-gram (n <= max_n) ending the
    context that also ends at an earlier position, its latest such occurrence, what followed."""
    for n in range(min(max_n, len(ctx) - 1), 0, -1):
        tail = ctx[len(ctx) - n:]
        for end in range(len(ctx) - 2, n - 2, -1):  # occurrences ending before the last token
            if ctx[end - n + 1:end + 1] == tail:
                follow = ctx[end + 1:end + 1 + k]
                return follow + [follow[-1]] * (k - len(follow))
    return [ctx[-1]] * k


def test_index_proposes_what_the_scan_proposes_as_tokens_arrive():
    rng = random.Random(0)
    for trial in range(40):
        vocab = rng.choice([3, 5, 20])  # small vocabularies: many matches of every length
        idx = LookupIndex()
        ctx: list[int] = []
        while len(ctx) < 120:
            new = [rng.randrange(vocab) for _ in range(rng.randint(1, 4))]
            ctx += new
            idx.extend(new)
            k = rng.randint(1, 6)
            assert idx.propose(k) == scan(ctx, k), (trial, len(ctx))


def test_truncate_forgets_the_tail():
    idx = LookupIndex()
    idx.extend([1, 2, 3, 9, 1, 2])
    assert idx.propose(2) == [3, 9]
    idx.truncate(3)
    assert idx.tokens == [1, 2, 3] and idx.propose(2) == [3, 3]  # nothing earlier matches 3
    with pytest.raises(ValueError):
        LookupIndex(min_n=3, max_n=2)


def test_match_length_is_the_ngram_the_proposal_follows():
    idx = LookupIndex()
    idx.extend([7, 8])
    assert idx.match_length() == 0 and idx.propose(2) == [8, 8]  # nothing matches: last token repeated
    idx.extend([1, 2, 3, 4, 5, 1, 2, 3, 4])
    assert idx.match_length() == 4 and idx.propose(2) == [5, 1]
    idx.extend([9, 4])
    assert idx.match_length() == 1 and idx.propose(1) == [9]  # only "4" occurred before (latest: then 9)


def test_lookup_acceptance_prices_each_request_by_the_match_it_has_now():
    """Evidence from long matches (accepted deep) and from no match (rejected) is kept apart:
    a request whose tail matches a 4-gram now is priced at the first, one with no match at the
    second, whatever the other requests' proposals did."""
    from goodspec.scheduler.lookup_acceptance import LookupAcceptance
    from goodspec.scheduler.request import Request
    from goodspec.workers.sampling import SamplingParams

    def request(rid, tokens):
        r = Request(rid, tokens, SamplingParams(max_new_tokens=8, seed=0))
        r.lookup = LookupIndex()
        r.lookup.extend(tokens)
        return r

    copying = request("copy", [1, 2, 3, 4, 5, 6, 1, 2, 3, 4])
    chatting = request("chat", [10, 11, 12, 13, 14])
    la = LookupAcceptance()
    for step in range(40):
        la.classify([copying, chatting])
        la.observe("copy", 8, 7)
        la.observe("chat", 8, 0)
    newcomer_long, newcomer_none = request("a", [5, 6, 7, 8, 9, 5, 6, 7, 8]), request("b", [20, 21])
    la.classify([newcomer_long, newcomer_none])
    gains = la.expected_tokens(["a", "b"], 8)
    assert gains[0, 8] > 5.0 and gains[1, 8] < 1.5
    la.forget("copy"), la.forget("chat"), la.forget("a"), la.forget("b")
    assert not any(e._per_request or e._vs_global for e in la.estimators())


def test_matched_prefix_is_the_verification_outcome():
    assert matched_prefix([5, 6, 7], [5, 6, 8, 1]) == (3, 2)  # rejected at the third
    assert matched_prefix([5, 6, 7], [4]) == (1, 0)
    assert matched_prefix([5, 6, 7], [5, 6]) == (2, 2)  # both compared tokens matched


def fitted_model() -> StepTimeModel:
    m = StepTimeModel()
    m.draft.coef = np.array([0.002, 0.001, 0.0005, 0.0, 0.01])  # a pass costs a little more than a token
    m.verify.coef = np.array([0.03, 0.001, 0.002, 0.0, 0.0, 0.0])
    m.num_fitted = 1
    return m


def geometric(alphas, kmax):
    a = np.asarray(alphas)[:, None]
    return np.cumsum(a ** np.arange(kmax + 1)[None, :], axis=1)


def test_choice_gives_lookup_to_the_copying_request_and_the_draft_to_the_other():
    gains = geometric([0.9, 0.5], 8)  # the draft: good on the chat request, middling on the copy
    lookup = geometric([0.05, 0.95], 8)
    c = best_choice(None, [300, 300], [8, 8], fitted_model(), gains=gains, lookup_gains=lookup)
    assert c.lookup == [False, True]
    assert c.ks[1] >= 6 and c.ks[0] >= 1


def test_a_batch_all_on_lookup_pays_no_draft_pass():
    """m = 0: lookup alone, no draft model call, even when the draft's tokens would be worth
    something on their own (its pass costs more than they bring here)."""
    model = fitted_model()
    model.draft.coef = np.array([0.05, 0.02, 0.001, 0.0, 0.01])  # an expensive draft pass
    c = best_choice(None, [300] * 3, [8] * 3, model, gains=geometric([0.4] * 3, 8),
                    lookup_gains=geometric([0.9] * 3, 8))
    assert all(c.lookup) and all(k > 0 for k in c.ks)
    on_lookup = model.predict_step_time(c.ks, [300] * 3, None, c.lookup)
    assert on_lookup == pytest.approx(model.predict_step_time([0] * 3, [300] * 3) + model.verify.coef[2] * sum(c.ks),
                                      rel=0.05)  # the verify tokens' cost alone (context grows a little)
    assert on_lookup < model.predict_step_time(c.ks, [300] * 3)


def test_without_lookup_evidence_the_choice_is_the_draft_alone():
    gains = geometric([0.7, 0.7], 8)
    with_lookup = best_choice(None, [300, 300], [8, 8], fitted_model(), gains=gains,
                              lookup_gains=np.ones((2, 9)))  # lookup never accepted
    assert with_lookup.lookup == [False, False]
    assert with_lookup.ks == best_choice(None, [300, 300], [8, 8], fitted_model(), gains=gains).ks


class _Draft:
    """A draft worker stand-in that records what it was asked (the merge is the edge tested)."""

    def __init__(self, vocab: int):
        self.vocab, self.batches = vocab, []

    def propose(self, batch):
        self.batches.append(batch)
        k = max(it.num_draft for it in batch.items)
        probs = torch.full((len(batch.items), k, self.vocab), 1.0 / self.vocab)
        return Proposal([[1] * it.num_draft for it in batch.items], probs, 0.0,
                        [[0.5] * it.num_draft for it in batch.items])


def test_lookup_rows_join_the_draft_proposal_after_the_rows_that_carry_probabilities():
    """The draft's q goes to the target as the draft made it; lookup's rows come after it and
    carry none (the target verifies them against the one-hot of their tokens:
    tests/workers/test_target_worker.py)."""
    from goodspec.scheduler.plan import StepPlan
    from goodspec.scheduler.request import Request
    from goodspec.workers.messages import VerifyItem
    from goodspec.workers.sampling import SamplingParams

    draft = _Draft(vocab=10)
    props = Proposers(draft, lookup=True)
    sampled = SamplingParams(temperature=1.0, seed=1, max_new_tokens=20)
    a = Request("a", [3, 4, 5], sampled)
    b = Request("b", [7, 8, 9, 7, 8], sampled)  # lookup proposes 9, 7, 8
    plan = StepPlan(ks={"a": 2, "b": 3}, lookup={"b"})
    for r in (a, b):
        plan.verify.append(VerifyItem(r.req_id, len(r.token_ids) - 1, r.token_ids[-1:], True, r.sampling))
        plan.verify_reqs.append(r)
    proposal, _ = props.propose(plan)
    assert [it.req_id for it in draft.batches[0].items] == ["a"]  # b never reached the draft
    assert plan.verify[1].draft_ids == [9, 7, 8]
    assert plan.verify[1].proposal_row == 1 and proposal.draft_ids[1] == [9, 7, 8]
    assert proposal.draft_probs.shape == (1, 2, 10)  # the draft's one row, unchanged
    assert proposal.draft_ids[plan.verify[0].proposal_row] == [1, 1]


def test_lookup_policy_is_parsed_and_needs_the_server_to_offer_lookup():
    from goodspec.config import EngineConfig
    from goodspec.scheduler.errors import RequestRejected
    from goodspec.scheduler.policy import PolicySpec
    from goodspec.scheduler.policy_book import PolicyBook
    from goodspec.scheduler.policy import OffPolicy

    spec = PolicySpec.parse(" LOOKUP:03")
    assert spec.name == "lookup:3" and spec.build().name == "lookup:3"
    with pytest.raises(ValueError, match="lookup:K needs an integer K"):
        PolicySpec.parse("lookup:x")
    with pytest.raises(RequestRejected, match="proposer auto"):
        PolicyBook(OffPolicy()).resolve(spec)
    offered = PolicyBook(OffPolicy(), lookup=True).resolve(spec)
    assert offered.uses_lookup("any") and offered.choose([None, None], [2, 5]) == [2, 3]
    with pytest.raises(ValueError, match="set proposer auto"):
        EngineConfig(model="tiny", policy="lookup:3")
    assert EngineConfig(model="tiny", policy="lookup:3", proposer="ngram").draft_dir is None


def test_a_lookup_request_reserves_no_draft_cache():
    """k lookup tokens grow the target's cache only: a step that fits the target fits even when
    the draft's cache has no room for k more tokens of that request."""
    from goodspec.scheduler.config import KVBudget
    from goodspec.scheduler.kv_planner import KVPlanner
    from goodspec.scheduler.request import Request
    from goodspec.workers.sampling import SamplingParams

    r = Request("r", list(range(30)), SamplingParams(max_new_tokens=20, seed=0))
    r.target_len, r.draft_len = 29, 30  # decoding; its draft has read every token (a feature draft)
    planner = KVPlanner(KVBudget(8, 16), KVBudget(2, 16))  # target 128 tokens, draft 32
    assert not planner.fits([r], {"r": 8}, {})  # drafting 8 more would need 37 draft positions
    assert planner.fits([r], {"r": 8}, {}, lookup={"r"})
