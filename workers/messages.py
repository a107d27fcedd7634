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


@dataclass
class ProposeItem:
    req_id: str
    start_pos: int  # tokens of this request the draft's cache keeps
    token_ids: list[int]  # committed tokens the draft has not seen yet (>= 1)
    num_draft: int  # k for this request this step (>= 1)
    sampling: SamplingParams  # seed always set


@dataclass
class ProposeBatch:
    items: list[ProposeItem]
    # For a feature draft: [sum(len(item.token_ids)), d], the target's hidden state at the
    # position before each of the items' tokens, rows in item order. None: zeros (a profiling
    # run; drafts are worse, never wrong).
    features: torch.Tensor | None = None


@dataclass
class Proposal:
    draft_ids: list[list[int]]  # per item, num_draft tokens
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
