"""Who drafts for each request of a step, and the state each proposer needs carried.

Two proposers: the draft model (a worker with a KV cache; a feature draft also reads the
target's hidden states) and, with `lookup=True`, prompt lookup run here in the scheduler
(goodspec.scheduler.lookup: no model, no worker, proposals at no draft cost). The policy picks
one per request and step (StepPlan.lookup); this object sends the draft model its requests,
proposes the others from their lookup index, and hands back one Proposal for the target. With
no draft model (proposer ngram) lookup proposes for every request.

It also scores lookup on the requests that did not use it, against the tokens the target then
committed (`shadow_outcomes`): the policy learns each request's lookup acceptance without
spending a verification on it, so a copy-heavy request is found before it is tried.
"""

from __future__ import annotations

import time

import torch

from goodspec.scheduler.lookup import LookupIndex, matched_prefix
from goodspec.scheduler.plan import StepPlan
from goodspec.scheduler.request import Request
from goodspec.workers.messages import ProposeBatch, ProposeItem, Proposal, VerifyResult


class Proposers:
    def __init__(self, draft, lookup: bool = False, shadow_depth: int = 8) -> None:
        self.draft = draft
        # A feature draft reads the target's hidden states: verification returns them.
        self.reads_features = bool(getattr(draft, "reads_features", False))
        self.feature_layers = tuple(getattr(draft, "feature_layers", ()))  # a fused one's target blocks
        self._feature_width = 0  # learned from the first verification that returns features
        self.lookup = lookup
        self.shadow_depth = shadow_depth
        self._shadow: dict[str, tuple[int, list[int]]] = {}  # req_id -> (position, proposal)

    # -- lookup state -------------------------------------------------------------------------
    def index(self, r: Request) -> LookupIndex:
        """The request's lookup index, brought up to its committed tokens."""
        if r.lookup is None:
            r.lookup = LookupIndex()
        idx = r.lookup
        if len(idx.tokens) > len(r.token_ids):
            idx.truncate(len(r.token_ids))
        if len(idx.tokens) < len(r.token_ids):
            idx.extend(r.token_ids[len(idx.tokens):])
        return idx

    def score_ahead(self, decode: list[tuple[Request, int]]) -> None:
        """Before the step: what lookup would propose for each (decoding request, its k cap)
        (scored against the committed tokens in `shadow_outcomes`)."""
        if not self.lookup:
            return
        for r, cap in decode:
            if cap > 0:
                self._shadow[r.req_id] = (len(r.token_ids), self.index(r).propose(min(cap, self.shadow_depth)))

    def shadow_outcomes(self, plan: StepPlan, result: VerifyResult) -> list[tuple[str, int, int]]:
        """(req_id, tokens compared, tokens matched) of lookup's proposal against what the target
        committed, for the decoding requests that did not use lookup this step."""
        out = []
        for item, r, new_ids in zip(plan.verify, plan.verify_reqs, result.output_ids):
            shadow = self._shadow.pop(r.req_id, None)
            if shadow is None or r.req_id in plan.lookup or not new_ids:
                continue
            pos, proposed = shadow
            if pos == item.start_pos + len(item.token_ids):
                compared, matched = matched_prefix(proposed, new_ids)
                out.append((r.req_id, compared, matched))
        self._shadow.clear()
        return out

    # -- proposing ----------------------------------------------------------------------------
    def propose(self, plan: StepPlan) -> tuple[Proposal | None, float]:
        """One Proposal for the step: the draft model's rows for its requests, lookup's for the
        requests in plan.lookup (q one-hot: no probabilities, confidence 1)."""
        items, features, by_lookup = [], [], []
        for row_item, r in zip(plan.verify, plan.verify_reqs):
            k = plan.ks.get(r.req_id, 0)
            if k == 0:
                continue
            if r.req_id in plan.lookup:
                by_lookup.append((row_item, self.index(r).propose(k)))
                continue
            row_item.proposal_row = len(items)
            start = r.draft_len
            items.append(ProposeItem(r.req_id, start, r.token_ids[start:], k, r.sampling,
                                     r.req_id in plan.may_stop))
            plan.draft_catchup += len(r.token_ids) - start - 1
            if self.reads_features and self._feature_width:
                features.append(r.features.take(start, len(r.token_ids) - start, self._feature_width))
        if not items and not by_lookup:
            return None, 0.0
        t0 = time.perf_counter()
        if items:
            stop = plan.draft_stop if any(it.may_stop for it in items) else None
            proposal = self.draft.propose(ProposeBatch(items, torch.cat(features) if features else None, stop))
        else:
            proposal = Proposal(draft_ids=[], draft_probs=None, elapsed_s=0.0, draft_conf=[])
        elapsed = time.perf_counter() - t0 if items else 0.0
        for row_item, r in zip(plan.verify, plan.verify_reqs):
            if row_item.proposal_row >= 0:
                row_item.draft_ids = proposal.draft_ids[row_item.proposal_row]
                if self.reads_features:
                    # Its drafted tokens read its own guessed features: the next proposal feeds
                    # the accepted ones again, with the target's.
                    r.draft_len = len(r.token_ids)
                    r.features.drop_before(r.draft_len - 1)
                else:
                    r.draft_len = len(r.token_ids) + len(row_item.draft_ids) - 1
        if by_lookup:
            proposal = self._with_lookup(proposal, by_lookup)
        return proposal, elapsed

    @staticmethod
    def _with_lookup(proposal: Proposal, by_lookup: list) -> Proposal:
        """The draft model's proposal with lookup's rows appended after its own. Lookup's rows
        carry no probabilities (q is the one-hot of the proposed token, which the target builds),
        so the model's q goes on unchanged, over the draft's vocabulary."""
        ids = list(proposal.draft_ids)
        conf = list(proposal.draft_conf) if proposal.draft_conf is not None else [[] for _ in ids]
        for row_item, tokens in by_lookup:
            row_item.proposal_row = len(ids)
            row_item.draft_ids = tokens
            ids.append(tokens)
            conf.append([1.0] * len(tokens))
        return Proposal(draft_ids=ids, draft_probs=proposal.draft_probs, elapsed_s=proposal.elapsed_s,
                        draft_conf=conf)

    def keep_features(self, plan: StepPlan, result: VerifyResult) -> None:
        """Each request's rows of the target's hidden states, for its next proposal."""
        if not self.reads_features:
            return
        kept = [len(item.token_ids) + a for item, a in zip(plan.verify, result.num_accepted)]
        if result.features is None or result.features.shape[0] != sum(kept):
            raise RuntimeError(f"the target returned {None if result.features is None else result.features.shape[0]} "
                               f"feature rows for {sum(kept)} committed tokens")
        self._feature_width = result.features.shape[1]
        for item, r, rows in zip(plan.verify, plan.verify_reqs, result.features.split(kept)):
            r.features.put(item.start_pos, rows)
