"""A request's whole state, owned by the scheduler."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from goodspec.scheduler.features import FeatureBuffer
from goodspec.scheduler.lookup import LookupIndex
from goodspec.workers.sampling import SamplingParams


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    CANCELLED = "cancelled"
    ERROR = "error"  # the engine could not finish it (a worker that cannot be restarted)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    req_id: str
    prompt_ids: list[int]
    sampling: SamplingParams  # seed always set (the scheduler picks one when the user did not)
    policy: object | None = None  # a SpeculationPolicy overriding the server's for this request
    max_k: int | None = None  # per-request cap on speculation length
    arrival_time: float = field(default_factory=time.monotonic)

    token_ids: list[int] = field(init=False)  # prompt then output
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None
    # How many of token_ids each worker's KV cache holds. In decode, target_len = len - 1: the
    # newest token is fed in the next step.
    target_len: int = 0
    draft_len: int = 0
    # For a feature draft: the target's hidden states it has yet to read.
    features: FeatureBuffer = field(default_factory=FeatureBuffer)
    # With prompt lookup on: the n-grams of its committed tokens (goodspec.scheduler.lookup).
    lookup: LookupIndex | None = None
    num_preemptions: int = 0
    num_draft_proposed: int = 0
    num_draft_accepted: int = 0
    num_lookup_proposed: int = 0  # of num_draft_proposed: prompt lookup's
    num_lookup_accepted: int = 0
    num_spec_steps: int = 0  # decode steps (with k = 0 or more)
    sum_k: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def num_pending(self) -> int:
        """Committed tokens the target has not processed yet (1 in steady decode)."""
        return len(self.token_ids) - self.target_len

    @property
    def in_decode(self) -> bool:
        return self.num_pending == 1

    @property
    def mean_k(self) -> float:
        return self.sum_k / self.num_spec_steps if self.num_spec_steps else 0.0

    def reset_caches(self) -> None:
        """After preemption or a worker restart: both caches are recomputed from position 0."""
        self.target_len = 0
        self.draft_len = 0
        self.features.clear()
