"""Prompt lookup in the scheduler: the incremental index proposes what the worker-side scan
proposes, scoring is the outcome verification would have had, and the choice between the draft
model and lookup goes where the goodput is."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from goodspec.scheduler.goodput import StepTimeModel, best_choice
from goodspec.scheduler.lookup import LookupIndex, matched_prefix
from goodspec.scheduler.proposers import Proposers
from goodspec.workers.messages import ProposeBatch, ProposeItem, Proposal
from goodspec.workers.ngram_proposer import NgramProposer


def test_index_proposes_what_the_scan_proposes_as_tokens_arrive():
    rng = random.Random(0)
    scan = NgramProposer()
    for trial in range(40):
        vocab = rng.choice([3, 5, 20])  # small vocabularies: many matches of every length
        idx = LookupIndex()
        ctx: list[int] = []
        while len(ctx) < 120:
            new = [rng.randrange(vocab) for _ in range(rng.randint(1, 4))]
            ctx += new
            idx.extend(new)
            k = rng.randint(1, 6)
            want = scan.propose(ProposeBatch([ProposeItem("r", 0, ctx, k, None)])).draft_ids[0]
            assert idx.propose(k) == want, (trial, len(ctx))


def test_truncate_forgets_the_tail():
    idx = LookupIndex()
    idx.extend([1, 2, 3, 9, 1, 2])
    assert idx.propose(2) == [3, 9]
    idx.truncate(3)
    assert idx.tokens == [1, 2, 3] and idx.propose(2) == [3, 3]  # nothing earlier matches 3
    with pytest.raises(ValueError):
        LookupIndex(min_n=3, max_n=2)


def test_matched_prefix_is_the_verification_outcome():
    assert matched_prefix([5, 6, 7], [5, 6, 8, 1]) == (3, 2)  # rejected at the third
    assert matched_prefix([5, 6, 7], [4]) == (1, 0)
    assert matched_prefix([5, 6, 7], [5, 6]) == (2, 2)  # both compared tokens matched


def fitted_model() -> StepTimeModel:
    m = StepTimeModel()
    m.draft.coef = np.array([0.002, 0.001, 0.0005, 0.0, 0.01])  # a pass costs a little more than a token
    m.verify.coef = np.array([0.03, 0.001, 0.002, 0.0])
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

    stateless = True

    def __init__(self, vocab: int):
        self.vocab, self.batches = vocab, []

    def propose(self, batch):
        self.batches.append(batch)
        k = max(it.num_draft for it in batch.items)
        probs = torch.full((len(batch.items), k, self.vocab), 1.0 / self.vocab)
        return Proposal([[1] * it.num_draft for it in batch.items], probs, 0.0,
                        [[0.5] * it.num_draft for it in batch.items])


def test_lookup_rows_join_the_draft_proposal_with_one_hot_probabilities():
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
    row = plan.verify[1].proposal_row
    probs = proposal.draft_probs[row]
    assert probs.shape == (3, 10) and torch.equal(probs.argmax(-1), torch.tensor([9, 7, 8]))
    assert torch.equal(probs.sum(-1), torch.ones(3))
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
