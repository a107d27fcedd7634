"""A proposer's acceptance, learned apart for each kind of proposal it is about to make.

Lookup's proposals are of very different quality depending on what they follow: a sampled
request's matches seldom run past the first token, a greedy request copying from its prompt
runs on for many, and within one request a proposal that follows a 4-gram seen before is far
more likely right than one following a single token, or nothing at all (then lookup repeats the
last token). One set of depth rates for all of them priced chat requests' weak 1-gram proposals
at the copy requests' deep rates (a traced mixed run: 238 lookup tokens chosen for greedy chat
requests, 42 accepted). So the evidence is kept per (greedy, match length) class, each an
AcceptanceEstimator (global depth rates and each request's own scale within the class), and a
request is priced each step with the class of the proposal it would get now.

The draft model's acceptance is kept the same way, per greedy or sampled request: sampled
requests (temperature 0.7-1.0) accept about 0.3 of its tokens where greedy chat accepts 0.55,
and pooled with them a new sampled request was priced at the greedy rate until its own
evidence (ten-odd verifications, shrunk towards the pool) pulled it down.
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence

import numpy as np

from goodspec.scheduler.goodput import AcceptanceEstimator, tokens_from_reach
from goodspec.scheduler.request import Request

LookupClass = tuple[bool, int]  # (greedy, length of the n-gram the proposal follows; 0 = none)


def lookup_class(r: Request) -> LookupClass:
    """What lookup would propose for `r` now. Reads the request's lookup index, which the
    scheduler's proposers keep current."""
    return (r.sampling.temperature <= 0, r.lookup.match_length() if r.lookup is not None else 0)


def sampling_class(r: Request) -> bool:
    """Greedy (True) or sampled: the draft model's acceptance differs most along this line."""
    return r.sampling.temperature <= 0


class ClassedAcceptance:
    """One AcceptanceEstimator per class of request (`key`); a request unseen by `classify` is
    priced in class `default`."""

    def __init__(self, key: Callable[[Request], Hashable] = lookup_class,
                 default: Hashable = (True, 0)) -> None:
        self.key = key
        self.default = default
        self._estimators: dict[Hashable, AcceptanceEstimator] = {}
        self._class: dict[str, Hashable] = {}  # each request's class at its last `classify`

    def classify(self, requests: Sequence[Request]) -> None:
        """Note each request's class now (before the step: its evidence this step feeds it)."""
        for r in requests:
            self._class[r.req_id] = self.key(r)

    def _estimator(self, cls: Hashable) -> AcceptanceEstimator:
        est = self._estimators.get(cls)
        if est is None:
            est = self._estimators[cls] = AcceptanceEstimator()
        return est

    def observe(self, req_id: str, num_draft: int, num_accepted: int) -> None:
        """A proposal's outcome (verified, or, lookup's, scored against what the target committed)."""
        self.observe_many([(req_id, num_draft, num_accepted)])

    def observe_many(self, outcomes: Sequence[tuple[str, int, int]]) -> None:
        """One step's outcomes, each given to the estimator of its request's class."""
        groups: dict[Hashable, list[tuple[str, int, int]]] = {}
        for outcome in outcomes:
            groups.setdefault(self._class.get(outcome[0], self.default), []).append(outcome)
        for cls, seen in groups.items():
            self._estimator(cls).observe_many(seen)

    def expected_tokens(self, req_ids: Sequence[str], kmax: int) -> np.ndarray:
        """[requests, kmax + 1]: E_i(k) of k proposed tokens, each request priced in its class."""
        reach = np.empty((len(req_ids), kmax))
        groups: dict[Hashable, list[int]] = {}
        for i, r in enumerate(req_ids):
            groups.setdefault(self._class.get(r, self.default), []).append(i)
        for cls, rows in groups.items():  # one estimator call per class present, not per request
            est = self._estimator(cls)
            reach[rows] = est.global_reach(kmax)[None, :] * est.scales([req_ids[i] for i in rows])[:, None]
        return tokens_from_reach(reach)

    def forget(self, req_id: str) -> None:
        for est in self._estimators.values():
            est.forget(req_id)
        self._class.pop(req_id, None)

    def estimators(self) -> list[AcceptanceEstimator]:
        return list(self._estimators.values())


LookupAcceptance = ClassedAcceptance  # prompt lookup's: classed by lookup_class, the default key
