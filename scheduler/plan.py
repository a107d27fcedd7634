"""A step's plan, what it produced per request, and the record it leaves for the policies."""

from __future__ import annotations

from dataclasses import dataclass, field

from goodspec.scheduler.request import FinishReason, Request
from goodspec.scheduler.step_record import StepRecord
from goodspec.workers.messages import DraftStop, Proposal, VerifyItem, VerifyResult


@dataclass
class RequestOutput:
    """What one step produced for one request: its new tokens, and whether it finished."""

    req_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None = None


@dataclass
class StepPlan:
    """One target forward: its items (decodes first, then prefill chunks), their requests, and
    the k chosen for each decoding request."""

    verify: list[VerifyItem] = field(default_factory=list)
    verify_reqs: list[Request] = field(default_factory=list)
    ks: dict[str, int] = field(default_factory=dict)
    draft_catchup: int = 0  # committed tokens the draft catches up on beyond the pending ones
    choose_time: float = 0.0  # seconds the policies took to choose the ks and what to verify
    lookup: set[str] = field(default_factory=set)  # requests whose k tokens come from prompt lookup
    draft_stop: DraftStop | None = None  # when the draft may end these requests' drafting early
    may_stop: set[str] = field(default_factory=set)  # (read only for the draft model's rows)
    finished: list[Request] = field(default_factory=list)  # requests the step finished

    @property
    def prefill_tokens(self) -> int:
        """Tokens of the prompt chunks in the target's forward."""
        return sum(len(it.token_ids) for it, r in zip(self.verify, self.verify_reqs) if r.req_id not in self.ks)

    def decode_outcomes(self, result: VerifyResult) -> list[tuple[Request, int, int]]:
        """(request, k, accepted) for each decoding request of the step."""
        return [(r, len(item.draft_ids), accepted)
                for item, r, accepted in zip(self.verify, self.verify_reqs, result.num_accepted)
                if r.req_id in self.ks]

    def record(self, proposal: Proposal | None, result: VerifyResult, t_draft: float,
               t_verify: float, t_step: float) -> StepRecord:
        items = self.verify
        ks = [len(it.draft_ids) for it in items if it.sample]  # verified
        # Drafted by the draft model (prompt lookup costs it nothing): a policy may verify less
        # than the draft proposed (adaptive verification).
        drafted = [len(proposal.draft_ids[it.proposal_row])
                   if proposal is not None and it.proposal_row >= 0 and it.req_id not in self.lookup
                   else 0 for it in items if it.sample]
        return StepRecord(
            batch_size=len(items),
            num_decode=sum(1 for r in self.verify_reqs if r.req_id in self.ks),
            num_draft_reqs=sum(1 for k in ks if k > 0),  # verified any draft tokens, whoever proposed them
            draft_tokens=sum(drafted),
            draft_catchup_tokens=self.draft_catchup,
            verify_tokens=sum(len(it.token_ids) + len(it.draft_ids) for it in items),
            context_tokens=sum(it.start_pos + len(it.token_ids) for it in items),
            max_context=max(it.start_pos + len(it.token_ids) + len(it.draft_ids) for it in items),
            max_k=max(drafted, default=0),
            num_accepted=sum(result.num_accepted),
            draft_time=t_draft,
            verify_time=t_verify,
            draft_compute_time=proposal.elapsed_s if proposal is not None else 0.0,
            verify_compute_time=result.elapsed_s,
            step_time=t_step,
            choose_time=self.choose_time,
            ks=ks,
            lookup_tokens=sum(len(it.draft_ids) for it in items if it.req_id in self.lookup),
            prefill_tokens=self.prefill_tokens,
        )
