"""Adaptive verification: verify only the part of each proposal that is worth its cost.

After the draft has proposed, every draft position has a confidence: the top probability of the
draft's distribution there. `ConfidenceCalibrator` learns online what a confidence is worth: the
chance the target accepts the token drafted there, given the tokens before it were accepted
(binned, decayed counts from this engine's own verifications; greedy and sampled requests apart,
since a sampled token is accepted with probability min(1, p/q), a greedy one when the argmaxes
agree). A slot's survival is the product of those chances along its prefix: the probability that
verifying it yields a token. The verify time of each extra token comes from the learned
step-time model. This is mainline vLLM's adaptive verification, with goodspec's online model of
this machine as the cost instead of an offline profile.

Greedy requests: the global top-B slots by survival, B maximising the step's expected tokens per
second (draft time, already spent, plus predicted verify time). Any cut is lossless there.

Sampled requests: a cut that looks at the drafted token itself would bias the output (verifying
d_j only when it looks good skews which tokens are accepted). So the confidence is a property of
the draft's distribution at the position, decided by the tokens before it, and slot j is
verified iff its survival clears the goodput level of the previous step: whether the verifier
looks at position j depends only on draft tokens 1..j-1 (a stopping rule), and everything after
the cut is the target's own sample, so rejection sampling stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from goodspec.scheduler.step_time import StepTimeModel, verify_features
from goodspec.workers.messages import CONFIDENCE_BINS as BINS


def _bins(conf: Sequence[float]) -> np.ndarray:
    return np.minimum((np.asarray(conf, dtype=float) * BINS).astype(int), BINS - 1)


@dataclass
class ConfidenceCalibrator:
    """P(accept | draft confidence bin, earlier tokens accepted), per sampling mode."""

    decay: float = 0.999  # per observed verification: about the last thousand count
    prior: float = 4.0  # pseudo-trials at the bin's own confidence (the draft taken at its word)
    # [mode (0 greedy, 1 sampled), (accepted, trials), bin]
    _counts: np.ndarray = field(default_factory=lambda: np.zeros((2, 2, BINS)))

    def observe(self, conf: Sequence[float], accepted: int, greedy: bool) -> None:
        """One verification of draft positions with confidences `conf`, of which the first
        `accepted` were accepted: those are successes, the next one (if any) a failure, and the
        ones after it were never judged."""
        judged = min(len(conf), accepted + 1)
        if judged == 0:
            return
        c = self._counts[0 if greedy else 1]
        c *= self.decay
        b = _bins(conf[:judged])
        np.add.at(c[1], b, 1.0)
        np.add.at(c[0], b[:accepted], 1.0)

    def rates(self, greedy: bool) -> np.ndarray:
        accepted, trials = self._counts[0 if greedy else 1]
        middle = (np.arange(BINS) + 0.5) / BINS
        return (accepted + self.prior * middle) / (trials + self.prior)

    def mean_rate(self, greedy: bool) -> float:
        """P(accept) of a reached position, over all confidences (the prior: a coin flip)."""
        accepted, trials = self._counts[0 if greedy else 1].sum(-1)
        return float((accepted + self.prior * 0.5) / (trials + self.prior))

    def survival(self, conf: Sequence[float], greedy: bool) -> np.ndarray:
        """P(positions 1..j of this proposal all accepted), j = 1..len(conf)."""
        if not len(conf):
            return np.zeros(0)
        return np.cumprod(self.rates(greedy)[_bins(conf)])


@dataclass(frozen=True)
class VerifyShape:
    """The step's decodes before any draft token is added (a prompt chunk beside them is not
    priced in: PolicyBook.trim)."""

    num_items: int  # decoding sequences in the forward
    tokens: int  # tokens they process without draft tokens
    emitting: int  # those that emit a token whatever is verified
    longest: int  # the longest context among them
    draft_time: float  # seconds the draft call took (spent already)


def verify_lengths(survival: Sequence[np.ndarray], greedy: Sequence[bool], shape: VerifyShape,
                   model: StepTimeModel, level: float | None) -> tuple[list[int], float]:
    """How many of each proposal's positions to verify, and this step's goodput level (expected
    tokens per second) for the next step's sampled requests. `level`: the previous step's, None
    at first (sampled proposals are then verified whole)."""
    per_token = float(model.verify.coef[2])  # seconds one more verified token adds
    lengths = [0] * len(survival)
    for i, (s, g) in enumerate(zip(survival, greedy)):
        if not g:  # a stopping rule: position j iff its survival clears a level fixed beforehand
            lengths[i] = len(s) if level is None else int((s >= level * per_token).sum())
    fixed = sum(lengths)
    fixed_gain = sum(float(s[:n].sum()) for s, n in zip(survival, lengths))
    rows = [i for i, g in enumerate(greedy) if g and len(survival[i])]
    value = np.concatenate([survival[i] for i in rows]) if rows else np.zeros(0)
    row = np.concatenate([np.full(len(survival[i]), i) for i in rows]) if rows else np.zeros(0, dtype=int)
    depth = np.concatenate([np.arange(len(survival[i])) for i in rows]) if rows else np.zeros(0, dtype=int)
    order = np.lexsort((depth, -value))  # survival falls along a proposal: top-B is a prefix of each
    gain = shape.emitting + fixed_gain + np.concatenate([[0.0], np.cumsum(value[order])])  # B = 0..
    base = model.verify.predict(verify_features(shape.num_items, shape.tokens + fixed, shape.longest + 1))
    cost = shape.draft_time + np.maximum(base + per_token * np.arange(len(value) + 1), 1e-9)
    ratio = gain / cost
    best = int(np.argmax(ratio))
    for i in row[order[:best]]:
        lengths[int(i)] += 1
    return lengths, float(ratio[best])
