"""Prompt lookup's acceptance, learned apart for each kind of proposal it is about to make.

Lookup's proposals are of very different quality depending on what they follow: a sampled
request's matches seldom run past the first token, a greedy request copying from its prompt
runs on for many, and within one request a proposal that follows a 4-gram seen before is far
more likely right than one following a single token, or nothing at all (then lookup repeats the
last token). One set of depth rates for all of them priced chat requests' weak 1-gram proposals
at the copy requests' deep rates (a traced mixed run: 238 lookup tokens chosen for greedy chat
requests, 42 accepted). So the evidence is kept per (greedy, match length) class, each an
AcceptanceEstimator (global depth rates and each request's own scale within the class), and a
request is priced each step with the class of the proposal it would get now.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from goodspec.scheduler.goodput import AcceptanceEstimator
from goodspec.scheduler.request import Request

LookupClass = tuple[bool, int]  # (greedy, length of the n-gram the proposal follows; 0 = none)


class LookupAcceptance:
    def __init__(self) -> None:
        self._estimators: dict[LookupClass, AcceptanceEstimator] = {}
        self._class: dict[str, LookupClass] = {}  # each request's class at its last `classify`

    def classify(self, requests: Sequence[Request]) -> None:
        """Note each request's class now (before the step: its evidence this step feeds it).
        Reads the request's lookup index, which the scheduler's proposers keep current."""
        for r in requests:
            n = r.lookup.match_length() if r.lookup is not None else 0
            self._class[r.req_id] = (r.sampling.temperature <= 0, n)

    def _estimator(self, cls: LookupClass) -> AcceptanceEstimator:
        est = self._estimators.get(cls)
        if est is None:
            est = self._estimators[cls] = AcceptanceEstimator()
        return est

    def observe(self, req_id: str, num_draft: int, num_accepted: int) -> None:
        """A lookup proposal's outcome (verified, or scored against what the target committed)."""
        self.observe_many([(req_id, num_draft, num_accepted)])

    def observe_many(self, outcomes: Sequence[tuple[str, int, int]]) -> None:
        """One step's outcomes, each given to the estimator of its request's class."""
        groups: dict[LookupClass, list[tuple[str, int, int]]] = {}
        for outcome in outcomes:
            groups.setdefault(self._class.get(outcome[0], (True, 0)), []).append(outcome)
        for cls, seen in groups.items():
            self._estimator(cls).observe_many(seen)

    def expected_tokens(self, req_ids: Sequence[str], kmax: int) -> np.ndarray:
        """[requests, kmax + 1]: E_i(k) of k lookup tokens, each request priced in its class."""
        rows: list[list[float]] = [[] for _ in req_ids]
        groups: dict[LookupClass, list[int]] = {}
        for i, r in enumerate(req_ids):
            groups.setdefault(self._class.get(r, (True, 0)), []).append(i)
        for cls, members in groups.items():  # one estimator call per class present, not per request
            priced = self._estimator(cls).expected_rows([req_ids[i] for i in members], kmax)
            for i, row in zip(members, priced):
                rows[i] = row
        return np.array(rows).reshape(len(req_ids), kmax + 1)

    def forget(self, req_id: str) -> None:
        for est in self._estimators.values():
            est.forget(req_id)
        self._class.pop(req_id, None)

    def estimators(self) -> list[AcceptanceEstimator]:
        return list(self._estimators.values())
