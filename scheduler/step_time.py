"""The step-time model: the draft call's and the verify call's wall time of a candidate step,
linear in features of the step and fitted online by weighted non-negative least squares on the
scheduler's StepRecords, recent steps weighing more (goodspec.scheduler.goodput divides expected
tokens by it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from goodspec.scheduler.step_record import StepRecord


# Attention gathers every request's context padded to the longest one in the batch, so its cost
# follows (requests x longest context), not the sum of contexts.
def draft_features(sum_k: int, max_k: int, max_context: int, catchup: int = 0) -> list[float]:
    """[1 if any draft work, passes (max k), draft tokens (sum k), sum k * longest context / 1000,
    catch-up tokens / 100]. A request that has not speculated for a while makes the draft process
    every token it missed first: that cost belongs to the decision to speculate again."""
    if sum_k == 0:
        return [0.0] * 5
    return [1.0, float(max_k), float(sum_k), sum_k * max_context / 1000.0, catchup / 100.0]


def verify_features(batch_size: int, verify_tokens: int, max_context: int, prefill_tokens: int = 0,
                    speculating: int = 0) -> list[float]:
    """[1, requests, decode and draft tokens, requests * longest context / 1000, prompt-chunk
    tokens, requests verifying draft tokens]. The last prices a request's first draft token
    above its later ones: at batch 24 on an AVX2 CPU verifying 2 / 3 / 4 tokens a sequence cost
    1.54x / 1.80x / 2.07x a decode (`goodspec profile`), and one price per verified token made
    k = 1 look the cheapest where it was the dearest (BENCHMARKS.md, thirty-third session).
    A prompt chunk's tokens get their own cost: the target's linear layers do hundreds
    of rows at a time more cheaply per row than the tens of a decode batch, and one slope for
    both took its value from the chunks. It priced a verified draft token of the real pair at
    0.84 ms where a decode batch of 21-23 paid 1.3-1.7 ms for each (saturated, over Ray;
    BENCHMARKS.md, twenty-sixth session), and goodput speculated where it lost."""
    return [1.0, float(batch_size), float(verify_tokens - prefill_tokens), batch_size * max_context / 1000.0,
            float(prefill_tokens), float(speculating)]


def record_features(r: StepRecord) -> tuple[list[float], list[float]]:
    return (draft_features(r.draft_tokens, r.max_k, r.max_context, r.draft_catchup_tokens),
            verify_features(r.batch_size, r.verify_tokens, r.max_context, r.prefill_tokens, r.num_draft_reqs))


@dataclass
class LinearTimeModel:
    """t = features . coef, coef >= 0, fitted by weighted non-negative least squares."""

    coef: np.ndarray = field(default_factory=lambda: np.zeros(5))

    def predict(self, features: Sequence[float]) -> float:
        return float(np.dot(self.coef, features))

    def fit(self, x: np.ndarray, y: np.ndarray, w: np.ndarray) -> None:
        from scipy.optimize import nnls

        sw = np.sqrt(w)[:, None]
        # Relative error matters (a 1 ms step and a 100 ms step are both worth getting right):
        # divide each row by its target so least squares minimises squared relative error.
        scale = 1.0 / np.maximum(y, 1e-6)[:, None]
        a = x * sw * scale
        b = (y[:, None] * sw * scale).ravel()
        self.coef, _ = nnls(a, b, maxiter=200)


class StepTimeModel:
    """Predicts the draft call's and the verify call's wall time of a candidate step."""

    def __init__(self, window: int = 2000, half_life: int = 200) -> None:
        self.draft = LinearTimeModel(np.zeros(len(draft_features(0, 0, 0))))
        self.verify = LinearTimeModel(np.zeros(len(verify_features(0, 0, 0))))
        self.window = window
        self.half_life = half_life
        self.num_fitted = 0
        self.fitted_around: int | None = None  # the last fit's `around` (None: every batch size alike)
        # Each record's features and times, made once: a refit reads up to window + the sweep's
        # records, and remaking every row in Python each time was half a refit's cost (2000 + 120
        # records: 1.9 ms a refit before, 1.0 with this; goodput refits every 16 steps).
        self._rows: dict[int, tuple[StepRecord, list[float]]] = {}

    # Live weight at which the sweep's records together weigh half what they weigh at first.
    PRIOR_FADE = 32.0
    # With `around`, a record's weight also falls with its batch's distance from that batch size:
    # by e^-1/2 at twice (or half) the size, e^-2 at four times.
    BATCH_SPREAD = float(np.log(2.0))
    # A fit around one batch size serves batches up to this factor from it (half BATCH_SPREAD in
    # log: ~1.41x); a batch further away wants a fit of its own (fits_batch).
    SERVES_SPREAD = BATCH_SPREAD / 2

    def fits_batch(self, batch_size: int) -> bool:
        """Whether the current fit was made for batches of about this size (a fit around no
        batch size serves none in particular)."""
        if self.fitted_around is None:
            return False
        return abs(np.log(max(batch_size, 1) / max(self.fitted_around, 1))) <= self.SERVES_SPREAD

    def fit(self, records: Sequence[StepRecord], prior: Sequence[StepRecord] = (),
            prior_weight: float = 0.2, around: int | None = None) -> None:
        """Fit on live `records` (newest weighs 1, halving every half_life steps) and on `prior`
        records (the start-up sweep): the sweep gives the shape before there is traffic, live
        steps on this machine's real batches decide once they exist. The sweep's weight,
        `prior_weight` a record beside the first live steps, fades as live weight accumulates:
        its uniform-k, idle-server steps priced a verified token of the real pair at 0.64 ms
        where saturated live steps paid 1.35, and at a fixed 0.2 it kept goodput's model 15%
        under the cost of its speculative steps there, where it then speculated and lost
        (BENCHMARKS.md, twenty-sixth session).
        `around` (a batch size): fit the steps near it, the batches the next choices are made for.
        The target's cost is not linear over the whole range (at batch 1 a verified token is
        almost free, memory-bound; at batch 24 it costs as much as a decoded one), so one line
        through every batch size the engine has run was wrong at both ends: after three lighter
        rates goodput chose k = 1-2 for 88% of its request-steps at 32 req/s (11% behind `off`);
        fitted around the batch, k = 0 for 97% (BENCHMARKS.md, twenty-sixth session).
        """
        records = list(records)[-self.window:]
        prior = list(prior)
        if len(records) + len(prior) < 8:
            return
        live = 0.5 ** (np.arange(len(records))[::-1] / self.half_life)
        faded = prior_weight * self.PRIOR_FADE / (self.PRIOR_FADE + float(live.sum())) if records else 1.0
        w = np.concatenate([np.full(len(prior), faded), live])
        records = prior + records
        if around is not None:
            distance = np.log(np.array([max(r.batch_size, 1) for r in records]) / max(around, 1))
            w = w * np.exp(-0.5 * (distance / self.BATCH_SPREAD) ** 2)
        n = len(records)
        table = np.array(self._cached_rows(records))  # [n, draft features + verify features + 2]
        nd, nv = len(self.draft.coef), len(self.verify.coef)
        xd, xv = table[:, :nd], table[:, nd:nd + nv]
        yd, yv = table[:, nd + nv], table[:, nd + nv + 1]
        has_draft = yd > 0
        if has_draft.sum() >= 4:
            self.draft.fit(xd[has_draft], yd[has_draft], w[has_draft])
        self.verify.fit(xv, yv, w)
        self.num_fitted = n
        self.fitted_around = around

    def _cached_rows(self, records: list[StepRecord]) -> list[list[float]]:
        """Each record's draft features + verify features + draft and verify seconds, made once
        per record (a StepRecord is not changed once the scheduler has made it). Cached by id
        beside the record itself: a cached record stays alive, so no other record can have its
        id; only the records of this fit are kept."""
        old, rows = self._rows, {}
        for r in records:
            row = old.get(id(r))
            if row is None:
                d, v = record_features(r)
                row = (r, d + v + [r.draft_time, r.verify_time])
            rows[id(r)] = row
        self._rows = rows
        return [rows[id(r)][1] for r in records]

    @property
    def ready(self) -> bool:
        return self.num_fitted > 0

    def predict_step_time(self, ks: Sequence[int], contexts: Sequence[int],
                          catchups: Sequence[int] | None = None,
                          lookup: Sequence[bool] | None = None) -> float:
        """Draft + verify seconds of a decode step; `lookup[i]`: request i's tokens come from
        prompt lookup (verified, never drafted)."""
        longest = max(c + k for c, k in zip(contexts, ks)) if ks else 0
        drafted = [0 if lookup and lookup[i] else k for i, k in enumerate(ks)]
        catchup = sum(c for c, k in zip(catchups, drafted) if k > 0) if catchups else 0
        draft = self.draft.predict(draft_features(sum(drafted), max(drafted, default=0), longest, catchup)) \
            if any(drafted) else 0.0
        return draft + self.verify.predict(verify_features(len(ks), sum(ks) + len(ks), longest,
                                                           speculating=sum(k > 0 for k in ks)))


def mape(model: StepTimeModel, records: Sequence[StepRecord]) -> float:
    """Mean absolute percentage error of predicted (draft + verify) time on records."""
    errs = []
    for r in records:
        d, v = record_features(r)
        pred = model.draft.predict(d) + model.verify.predict(v)
        actual = r.draft_time + r.verify_time
        errs.append(abs(pred - actual) / actual)
    return float(np.mean(errs)) if errs else float("nan")
