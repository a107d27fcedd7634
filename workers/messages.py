"""The small typed objects that cross the scheduler/worker boundary, one per call each way.

The scheduler builds a `ProposeBatch` for the draft worker and a `VerifyBatch` for the target
worker; the workers answer with a `Proposal` and a `VerifyResult`. Token ids are plain lists; the
only tensor is the draft's probabilities, which the scheduler passes on without looking inside.
Every item carries `start_pos`: the worker rolls that sequence's cache back to it before appending,
which is how rejected tokens are forgotten and how a lost cache is noticed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from goodspec.workers.sampling import SamplingParams


CONFIDENCE_BINS = 20  # a draft confidence (top probability of q, in [0, 1]) is read in this many equal bins


@dataclass
class ProposeItem:
    req_id: str
    start_pos: int  # tokens of this request the draft's cache keeps
    token_ids: list[int]  # committed tokens the draft has not seen yet (>= 1)
    num_draft: int  # k for this request this step (>= 1): the most it drafts
    sampling: SamplingParams  # seed always set
    may_stop: bool = False  # ProposeBatch.stop may end its drafting before num_draft


@dataclass(frozen=True)
class DraftStop:
    """When the draft stops drafting a request before its k, on low confidence (SpecDec++ and
    DISCO stop drafting so; vLLM's adaptive verification drafts to the end and cuts afterwards,
    which on a CPU pays for passes nobody verifies).

    reach_j = prod_{i <= j} rates[mode][bin(conf_i)]: the calibrated chance that verification
    accepts positions 1..j. A row that may stop drafts position j + 1 iff
    reach_j * next_rate[mode] >= row_cost + pass_cost / (rows drafting it), costs in tokens
    (the step's goodput level times seconds); where a row that may not stop drafts on, the pass
    is paid and only row_cost counts. conf_i is fixed by the draft tokens before position i, so
    this is a stopping rule: sampled output keeps the target's distribution (see
    goodspec.scheduler.confidence)."""

    rates: tuple[tuple[float, ...], tuple[float, ...]]  # P(accept | confidence bin): greedy rows, sampled rows
    next_rate: tuple[float, float]  # mean P(accept) of a reached position: greedy, sampled
    row_cost: float  # one more position of one request: its verify and draft token
    pass_cost: float  # one more draft pass, shared by the rows that draft in it


@dataclass
class ProposeBatch:
    items: list[ProposeItem]
    # For a feature draft: [sum(len(item.token_ids)), d], the target's hidden state at the
    # position before each of the items' tokens, rows in item order. None: zeros (a profiling
    # run; drafts are worse, never wrong).
    features: torch.Tensor | None = None
    stop: DraftStop | None = None  # for the items with may_stop


@dataclass
class Proposal:
    draft_ids: list[list[int]]  # per item, num_draft tokens (fewer where ProposeBatch.stop ended it)
    # [rows, max_k, vocab] draft distributions q over the draft model's own vocabulary (the
    # target maps a reduced one back: TargetWorker's draft_vocab), or None when every item is
    # greedy. Items past `rows` (prompt lookup's, appended by the scheduler) and greedy items
    # have q = the one-hot of their proposed token, which the verifier builds itself.
    draft_probs: torch.Tensor | None
    elapsed_s: float = 0.0
    # Per item, the top probability of the draft's distribution at each drafted position (not the
    # drawn token's: see goodspec.scheduler.confidence); None when the proposer has no
    # distribution (prompt lookup). What a policy calibrates to decide how much to verify.
    draft_conf: list[list[float]] | None = None


@dataclass
class VerifyItem:
    req_id: str
    start_pos: int  # tokens of this request the target's cache keeps
    token_ids: list[int]  # committed tokens to append: a prompt chunk, or the 1 pending token
    sample: bool  # emit tokens (False for a prompt chunk that does not finish the prompt)
    sampling: SamplingParams
    draft_ids: list[int] = field(default_factory=list)
    proposal_row: int = -1  # row of this item in VerifyBatch.proposal, -1 without drafts


@dataclass
class VerifyBatch:
    items: list[VerifyItem]
    proposal: Proposal | None = None
    want_features: bool = False  # return the hidden states a feature draft reads
    # ... and, before the last hidden state, the RMS-normalised outputs of these decoder blocks
    # (1-based; a fused feature draft's FeatureInput.target_layers)
    feature_layers: tuple[int, ...] = ()


@dataclass
class VerifyResult:
    num_accepted: list[int]  # per item (0 for items without drafts)
    output_ids: list[list[int]]  # per item: accepted draft tokens + 1 recovered/bonus token
    elapsed_s: float = 0.0
    # With VerifyBatch.want_features: [sum over items of len(token_ids) + num_accepted, d], the
    # target's last hidden state at each committed position it computed, rows in item order
    # ([..., (len(feature_layers) + 1) * d] with the asked blocks' outputs before it).
    features: torch.Tensor | None = None
