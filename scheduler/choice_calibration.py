"""What the goodput choice's acceptance predictions turn out to be worth once chosen.

The acceptance estimators are fitted on every proposal they see, prompt lookup's even on the ones
scored in the shadow of the draft's (goodspec.scheduler.lookup_acceptance). The choice then picks,
per request, the proposer and k whose predicted tokens look best, and that selection is biased: a
request whose noisy per-request scale came out high is the one chosen, and a request the draft
finds hard is the one lookup is chosen for, though such text is often hard for lookup too. Traced
on the real pair (goodspec.closed_batch, mixed workload, 24 requests): greedy lookup proposals
that follow a one-token match, once chosen, were accepted at 0.51 of their prediction (23 of 45
tokens), sampled requests' draft proposals at 0.90, greedy ones' at 1.06.

So each kind of option (draft or lookup, greedy or sampled, lookup's match-length class) keeps
decayed sums of what its chosen verifications were predicted to accept and did accept, and the
choice scales that kind's predicted accepted tokens by their ratio (a few pseudo-tokens at 1 keep
a new kind at its estimator's word). The estimators themselves are left as they are: they answer
"how good is this kind of proposal", this answers "how good is it when the choice takes it".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Sequence

import numpy as np

OptionKind = Hashable  # ("draft", greedy) or ("lookup", greedy, match length)


@dataclass
class ChoiceCalibration:
    decay: float = 0.99  # per chosen verification of the kind: about the last hundred count
    prior_tokens: float = 8.0  # pseudo accepted tokens, predicted and realized alike
    max_factor: float = 2.0
    _sums: dict[OptionKind, list[float]] = field(default_factory=dict)  # kind -> [predicted, realized]
    _pending: dict[str, tuple[OptionKind, int, float]] = field(default_factory=dict)  # req -> (kind, k, predicted)

    def factors(self, kinds: Sequence[OptionKind]) -> np.ndarray:
        """Realized over predicted accepted tokens of each kind's chosen verifications."""
        out = np.ones(len(kinds))
        for i, kind in enumerate(kinds):
            s = self._sums.get(kind)
            if s is not None:
                out[i] = (s[1] + self.prior_tokens) / (s[0] + self.prior_tokens)
        return np.minimum(out, self.max_factor)

    def apply(self, gains: np.ndarray, kinds: Sequence[OptionKind]) -> np.ndarray:
        """[requests, kmax + 1] E_i(k) (the bonus token included) with each row's accepted part
        scaled by its kind's factor, capped where every drafted token is accepted at 0.99."""
        f = self.factors(kinds)[:, None]
        ks = np.arange(gains.shape[1])[None, :]
        return np.minimum(1.0 + f * (gains - 1.0), 1.0 + 0.99 * ks)

    def expect(self, req_ids: Sequence[str], ks: Sequence[int], kinds: Sequence[OptionKind],
               predicted_accepted: Sequence[float]) -> None:
        """This step's choice: request i verifies ks[i] tokens of `kinds[i]`, predicted (before
        calibration) to accept `predicted_accepted[i]` of them."""
        for r, k, kind, p in zip(req_ids, ks, kinds, predicted_accepted):
            if k > 0:
                self._pending[r] = (kind, int(k), float(p))
            else:
                self._pending.pop(r, None)

    def observe(self, outcomes: Sequence[tuple[str, int, int]]) -> None:
        """(req_id, k verified, accepted) of the step; a verification cut or dropped to another k
        than was chosen is not what was predicted and teaches nothing here."""
        for req_id, k, accepted in outcomes:
            pending = self._pending.pop(req_id, None)
            if pending is None or pending[1] != k:
                continue
            kind, _, predicted = pending
            s = self._sums.setdefault(kind, [0.0, 0.0])
            s[0] = s[0] * self.decay + predicted
            s[1] = s[1] * self.decay + accepted

    def forget(self, req_id: str) -> None:
        self._pending.pop(req_id, None)
