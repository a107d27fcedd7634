"""Speculation policies: how many draft tokens (k) each decoding request gets this step."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

from goodspec.scheduler.request import Request


class SpeculationPolicy(ABC):
    """Chooses k_i >= 0 for each request of a decode batch. The scheduler clips each k_i to
    the request's caps (max_k, remaining tokens, context) before and after asking."""

    name: str

    @abstractmethod
    def choose(self, requests: Sequence[Request], caps: Sequence[int]) -> list[int]:
        """k for each request, each in 0..caps[i]."""


class OffPolicy(SpeculationPolicy):
    name = "off"

    def choose(self, requests: Sequence[Request], caps: Sequence[int]) -> list[int]:
        return [0] * len(requests)


class FixedPolicy(SpeculationPolicy):
    def __init__(self, k: int) -> None:
        if k < 0:
            raise ValueError(f"fixed speculation length must be >= 0; got fixed:{k}")
        self.k = k
        self.name = f"fixed:{k}"

    def choose(self, requests: Sequence[Request], caps: Sequence[int]) -> list[int]:
        return [min(self.k, c) for c in caps]


POLICY_NAMES = ("off", "fixed:K")


def parse_policy(spec: str) -> SpeculationPolicy:
    """'off' or 'fixed:K'."""
    text = spec.strip().lower()
    if text == "off":
        return OffPolicy()
    if text.startswith("fixed:"):
        try:
            k = int(text.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"unknown speculation policy {spec!r}: fixed:K needs an integer K") from None
        return FixedPolicy(k)
    raise ValueError(f"unknown speculation policy {spec!r}; expected one of {', '.join(POLICY_NAMES)}")
