"""What the scheduler measures about every step: the goodput model is fitted on these."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class StepRecord:
    batch_size: int  # requests in the target forward
    num_decode: int  # of which in decode (the rest are prefill chunks)
    num_draft_reqs: int  # requests that verified k > 0 draft tokens (the draft model's or prompt lookup's)
    draft_tokens: int  # sum of k_i: tokens the draft proposed
    verify_tokens: int  # tokens the target forward processed (chunks + pending + drafts)
    context_tokens: int  # sum over requests of context length after the step's input
    max_context: int  # the longest of them: attention pads every request to it
    max_k: int  # draft passes this step
    num_accepted: int  # draft tokens the target accepted
    draft_time: float  # wall seconds of the propose call, as the scheduler saw it
    verify_time: float  # wall seconds of the verify call, as the scheduler saw it
    draft_compute_time: float  # seconds inside the draft worker
    verify_compute_time: float  # seconds inside the target worker
    step_time: float  # the whole step, scheduling and commit included
    ks: list[int] = field(default_factory=list)
    # Committed tokens the draft had to catch up on beyond the one pending token per request
    # (after steps without speculation, or after a restart): its first pass processes them too.
    draft_catchup_tokens: int = 0
    choose_time: float = 0.0  # seconds the speculation policies took to choose this step's ks (and cuts)
    lookup_tokens: int = 0  # of the verified draft tokens, those prompt lookup proposed (not in draft_tokens)
    prefill_tokens: int = 0  # of verify_tokens, those of prompt chunks (not decodes' pending or draft tokens)

    def to_dict(self) -> dict:
        return asdict(self)
