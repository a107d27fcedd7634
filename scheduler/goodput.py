"""The goodput model: predicted step time, per-request acceptance, and the choice of k.

goodput(k_1..k_n) = sum_i E_i(k_i) / (T_draft(k) + T_verify(k))

- E_i(k) = (1 - alpha_i^(k+1)) / (1 - alpha_i): expected tokens one verification emits for a
  request whose draft tokens are each accepted with probability alpha_i (the bonus included).
- T_draft and T_verify come from the step-time model (goodspec.scheduler.step_time), fitted
  online on the scheduler's StepRecords.
- k is chosen to maximise that ratio exactly for each number of draft passes (SmartSpec's
  marginal-gain rule, applied per request at the optimum's goodput level): see best_ks.
  All-zero means no draft call at all, which is how the system falls back to plain decoding.
"""

from __future__ import annotations

import itertools
import operator
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from goodspec.scheduler.step_time import StepTimeModel, verify_features


# -- acceptance -------------------------------------------------------------------------------
def expected_tokens(alpha: float, k: int) -> float:
    """E(k) = 1 + alpha + ... + alpha^k: tokens emitted by one verification of k draft tokens."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def tokens_row(reach: Sequence[float], scale: float) -> list[float]:
    """E(k) for k = 0..len(reach), the tokens a verification of k draft tokens emits (the bonus
    included), from P(draft positions 1..j all accepted) times `scale`, each at most 0.99."""
    return list(itertools.accumulate((min(r * scale, 0.99) for r in reach), initial=1.0))


@dataclass
class AcceptanceEstimator:
    """Per-request acceptance probability: decayed counts of accepted draft tokens (successes)
    and first rejections (failures), shrunk towards the running global rate.

    How hard to shrink (`prior_weight`, in pseudo-trials) is learned from finished requests,
    empirical-Bayes style: if requests really differ, their own counts are trusted early; if
    they differ little, a few unlucky rejections no longer halve a new request's estimate (with
    a fixed weight of 1, one early rejection cut a good request's k for much of its life)."""

    decay: float = 0.9  # about the last 10 verifications of the request count
    prior_weight: float = 4.0  # until enough requests have finished to measure it
    min_prior_weight: float = 1.0
    max_prior_weight: float = 64.0
    min_finished: int = 16
    global_success: float = 1.0
    global_failure: float = 1.0
    depth_prior: float = 4.0  # pseudo-trials pulling a rarely reached depth to the pooled rate
    _per_request: dict[str, list[float]] = field(default_factory=dict)
    _totals: dict[str, list[float]] = field(default_factory=dict)  # undecayed, for the prior
    # Decayed successes / failures at each draft position, given all before it were accepted
    # (two lists, one entry per position seen so far).
    _depth: tuple[list[float], list[float]] = field(default_factory=lambda: ([], []))
    # Per request, decayed: accepted draft tokens, and what the global per-position rates
    # predicted for the same verifications (same k), so the two compare like with like.
    _vs_global: dict[str, list[float]] = field(default_factory=dict)
    _finished: deque = field(default_factory=lambda: deque(maxlen=256))

    def observe(self, req_id: str, num_draft: int, num_accepted: int) -> None:
        self.observe_many([(req_id, num_draft, num_accepted)])

    def observe_many(self, outcomes: Sequence[tuple[str, int, int]]) -> None:
        """(req_id, k, accepted) of one step's requests. Each is compared with the global rates
        as they stood before the step, and the global counts take the step's evidence at once
        (one update per step, not per request: the policy's whole observe fell from 1.4 to 0.4 ms
        a batch-32 step under cProfile here, and on an H100 host the time after each goodput step
        from about 0.7 to 0.6 ms: BENCHMARKS.md, GPU section).
        Plain Python over a batch of requests and max_k positions, not numpy: this runs after
        every step, between model forwards that evict numpy's code and data from the caches,
        where each numpy function called costs ~10-15 us. Measured with a 2048 x 2048 matmul
        before each call: 0.13 ms with numpy, 0.04 with this (back to back 15 us and 3 us)."""
        evidence = []
        for req_id, num_draft, num_accepted in outcomes:
            if num_draft > 0:
                evidence.append((req_id, num_draft, num_accepted))
                continue
            # No evidence this step: let the request's own record fade towards the global rate,
            # so a request judged poor is retried later instead of being written off for good
            # (acceptance comes in bursts; a k = 0 request would otherwise never be re-measured).
            for s in (self._per_request.get(req_id), self._vs_global.get(req_id)):
                if s is not None:
                    s[0] *= self.decay
                    s[1] *= self.decay
        if not evidence:
            return
        kmax = max(k for _, k, _ in evidence)
        # What the global rates predicted for each verification: sum of reach over its k positions.
        predicted = list(itertools.accumulate(self._reach(kmax), initial=0.0))
        successes = failures = 0
        for req_id, k, a in evidence:
            fail = 1.0 if a < k else 0.0
            successes += a
            failures += fail
            v = self._vs_global.setdefault(req_id, [0.0, 0.0])
            v[0] = v[0] * self.decay + a
            v[1] = v[1] * self.decay + predicted[k]
            s = self._per_request.setdefault(req_id, [0.0, 0.0])
            s[0] = s[0] * self.decay + a
            s[1] = s[1] * self.decay + fail
            t = self._totals.setdefault(req_id, [0.0, 0.0])
            t[0] += a
            t[1] += fail
        fade = 0.999 ** len(evidence)  # the global counts fade by 0.999 per verification
        self.global_success = self.global_success * fade + successes
        self.global_failure = self.global_failure * fade + failures
        accepted_at, rejected_at = self._depth
        if len(accepted_at) < kmax:
            accepted_at.extend([0.0] * (kmax - len(accepted_at)))
            rejected_at.extend([0.0] * (kmax - len(rejected_at)))
        # Position j (0-based) was reached and accepted by every verification with accepted > j,
        # and was the first rejection of each with accepted == j < k.
        width = len(accepted_at)
        ended = [0] * (width + 1)  # verifications by accepted count
        first_rejected = [0] * width  # ... and by the position of their first rejection
        for _, k, a in evidence:
            ended[a] += 1
            if a < k:
                first_rejected[a] += 1
        beyond = 0
        for j in range(width - 1, -1, -1):
            beyond += ended[j + 1]
            accepted_at[j] = accepted_at[j] * fade + beyond
            rejected_at[j] = rejected_at[j] * fade + first_rejected[j]

    @property
    def global_alpha(self) -> float:
        return self.global_success / (self.global_success + self.global_failure)

    def alpha(self, req_id: str) -> float:
        """The request's pooled per-token rate, shrunk towards the global one: a readable summary
        (and the geometric model's input); the policy prices k with expected_tokens, which
        compares a request with the global rates at the positions it was actually tried."""
        g = self.global_alpha
        s, f = self._per_request.get(req_id, (0.0, 0.0))
        a = (s + self.prior_weight * g) / (s + f + self.prior_weight)
        return min(a, 0.99)

    def depth_rates(self, kmax: int) -> np.ndarray:
        """Global acceptance at draft positions 1..kmax, each given the ones before it accepted.
        Not one constant: a prompt-lookup proposer's first token is a coin flip but once it
        matches it runs on (0.48 at position 1, 0.6-0.9 after, on the shipped target), so a
        single rate made its deep tokens look worth half what they are."""
        return np.array(self._rates(kmax))

    def _rates(self, kmax: int) -> list[float]:
        g = self.global_alpha
        accepted_at, rejected_at = self._depth
        seen = min(kmax, len(accepted_at))
        prior = self.depth_prior
        return [(a + prior * g) / (a + f + prior) for a, f in zip(accepted_at[:seen], rejected_at[:seen])] \
            + [g] * (kmax - seen)  # a position never reached: the pooled rate

    def _reach(self, kmax: int) -> list[float]:
        """P(draft positions 1..j all accepted), j = 1..kmax, at the global rates."""
        return list(itertools.accumulate(self._rates(kmax), operator.mul))

    def scale(self, req_id: str) -> float:
        """The request's accepted tokens over what the global rates predicted for the same
        verifications, shrunk towards 1. (Its pooled rate against the global pooled rate was
        biased: a request tried only shallow is measured at the hard first positions, looked
        worse than the global mix, was kept shallow — prompt lookup's accepted tokens came out
        30-40% above prediction at every k.)"""
        return self.scales([req_id])[0]

    def scales(self, req_ids: Sequence[str]) -> list[float]:
        """`scale` of each request (the choice is made every step, for the batch)."""
        w = self.prior_weight * self.global_alpha  # prior pseudo-trials, in accepted tokens
        none = (0.0, 0.0)
        return [(a + w) / (p + w) for a, p in (self._vs_global.get(r, none) for r in req_ids)]

    def expected_rows(self, req_ids: Sequence[str], kmax: int) -> list[list[float]]:
        """E_i(k) for k = 0..kmax, the tokens a verification of k draft tokens emits (bonus
        included): 1 + scale_i * (global reach of positions 1..k), each reach <= 0.99. Plain
        Python, as observe_many and for the same reason: measured as there, expected_tokens
        took 0.11 / 0.12 / 0.14 ms with numpy at 1 / 4 / 32 requests, 0.05 / 0.07 / 0.13 with
        this; past ~40 requests (max_num_seqs is 32 by default) numpy's is the cheaper (128:
        0.20 against 0.33 ms)."""
        reach = self._reach(kmax)
        return [tokens_row(reach, s) for s in self.scales(req_ids)]

    def expected_tokens(self, req_ids: Sequence[str], kmax: int) -> np.ndarray:
        """[requests, kmax + 1]: expected_rows as one array."""
        return np.array(self.expected_rows(req_ids, kmax)).reshape(len(req_ids), kmax + 1)

    def forget(self, req_id: str) -> None:
        self._per_request.pop(req_id, None)
        self._vs_global.pop(req_id, None)
        t = self._totals.pop(req_id, None)
        if t is not None and t[0] + t[1] >= 4:
            self._finished.append(t)
            if len(self._finished) >= self.min_finished:
                self.prior_weight = self._fit_prior_weight()

    def _fit_prior_weight(self) -> float:
        """Method of moments for a Beta prior over requests' acceptance rates: the spread of the
        finished requests' rates, less what their finite counts alone would produce, is the
        spread between requests; a Beta(m w, (1 - m) w) has variance m (1 - m) / (w + 1)."""
        t = np.asarray(self._finished)
        n = t.sum(axis=1)
        rates = t[:, 0] / n
        m = t[:, 0].sum() / n.sum()
        between = rates.var() - m * (1 - m) * np.mean(1.0 / n)
        if between <= 0:
            return self.max_prior_weight
        return float(np.clip(m * (1 - m) / between - 1.0, self.min_prior_weight, self.max_prior_weight))


# -- the choice of k --------------------------------------------------------------------------
@dataclass(frozen=True)
class SpeculationChoice:
    ks: list[int]  # draft tokens per request
    lookup: list[bool]  # whether request i's tokens come from prompt lookup (else the draft model)


def best_ks(alphas: Sequence[float] | None, contexts: Sequence[int], caps: Sequence[int],
            model: StepTimeModel, catchups: Sequence[int] | None = None,
            gains: np.ndarray | None = None, uniform: bool = False) -> list[int]:
    """best_choice with the draft model as the only proposer: the ks alone."""
    return best_choice(alphas, contexts, caps, model, catchups, gains, uniform).ks


def best_choice(alphas: Sequence[float] | None, contexts: Sequence[int], caps: Sequence[int],
                model: StepTimeModel, catchups: Sequence[int] | None = None,
                gains: np.ndarray | None = None, uniform: bool = False, lookup_gains: np.ndarray | None = None,
                margin: float = 0.0) -> SpeculationChoice:
    """The k_i (and, with `lookup_gains`, the proposer of each request) that maximise predicted
    goodput sum_i E_i(k_i) / T(k); no speculation unless that beats it by more than `margin`
    (a fraction: the step-time model's own error, StepEvidence.margin). T is the decodes' step:
    prompt chunks that may share the forward are left out (a step that carries them is priced as
    its decodes alone; GoodputPolicy.choose says why). E_i(k) is `gains[i, k]` when given
    (AcceptanceEstimator.expected_tokens; alphas may then be None), else geometric in alphas[i];
    `lookup_gains[i, k]` is the same for prompt lookup's k tokens.

    T has one cost shared by the whole batch that depends on the deepest k, the draft's passes
    (max k); everything else is per request: each draft token adds verify and draft work, and a
    request whose draft fell behind pays its catch-up once it speculates. A prompt-lookup token
    costs its verification only (no draft pass, no catch-up). So for each pass count m
    (0 included when lookup is offered) the problem separates per request, and the ratio is
    maximised exactly by Dinkelbach's method: at a goodput level G, request i takes the option
    (draft k <= min(m, cap_i), or lookup k <= cap_i) that maximises E_i(k) - G * (its cost), or
    k = 0 when nothing repays it; G is then updated to the new ratio until the choice stops
    changing. The best m wins.
    `uniform`: one k for the whole batch (each request's capped to its own limit), the best m
    alone, draft model only: SmartSpec's batch-level choice, kept to measure what per-request
    choice adds.
    (Request-by-request +1 moves cannot get here: the first request to go one deeper pays a whole
    extra draft pass alone, so a batch of requests that would all gain stays shallow.)"""
    n = len(caps)
    if n == 0 or max(caps, default=0) == 0:
        return SpeculationChoice([0] * n, [False] * n)
    cd, cv = model.draft.coef, model.verify.coef
    longest = max(contexts)  # the few extra positions k adds are ignored here
    cap = np.asarray(caps, dtype=int)
    catch = np.asarray(catchups, dtype=float) / 100.0 if catchups is not None else np.zeros(n)
    verify_base = model.verify.predict(verify_features(n, n, longest))  # the n decodes alone
    draft_per_token = cd[2] + cd[3] * longest / 1000.0
    kmax = int(cap.max())
    ks_grid = np.arange(kmax + 1)
    rows = np.arange(n)
    if gains is None:  # E_i(k) for k = 0..kmax: 1 + alpha + ... + alpha^k
        alpha = np.asarray(alphas, dtype=float)
        gains = np.cumsum(alpha[:, None] ** ks_grid[None, :], axis=1)  # [n, kmax + 1]
    else:
        gains = np.asarray(gains, dtype=float)[:, : kmax + 1]
    offer_lookup = lookup_gains is not None and not uniform
    # Every request's options in one table (numpy calls, not array sizes, are what this costs:
    # the choice is made every step): k = 0, the draft model's k = 1..kmax, then, when offered,
    # prompt lookup's k = 1..kmax. Each option has its tokens emitted and its own cost: a draft
    # token is drafted and verified, a lookup token only verified, and a request whose draft fell
    # behind pays its catch-up once it drafts.
    k_of, drafted_of, gain = ks_grid, ks_grid, gains
    if offer_lookup:
        k_of = np.concatenate([ks_grid, ks_grid[1:]])
        drafted_of = np.concatenate([ks_grid, np.zeros(kmax, dtype=int)])
        gain = np.concatenate([gains, np.asarray(lookup_gains, dtype=float)[:, 1: kmax + 1]], axis=1)
    own = cv[2] * k_of + cv[5] * (k_of > 0) + draft_per_token * drafted_of \
        + cd[4] * catch[:, None] * (drafted_of > 0)  # [n, O]

    def totals(choice: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predicted (tokens, seconds) of choices [..., n] (option indices), for every leading
        index: the batch shares the draft's launch and passes (its deepest draft), the rest is
        each option's."""
        passes = drafted_of[choice].max(-1)
        t = verify_base + own[rows, choice].sum(-1) + np.where(passes > 0, cd[0] + cd[1] * passes, 0.0)
        return gain[rows, choice].sum(-1), np.maximum(t, 1e-9)

    def goodput(choice: np.ndarray) -> np.ndarray:
        tokens, t = totals(choice)
        return tokens / t

    none = np.zeros(n, dtype=int)
    none_tokens, none_t = totals(none)  # no speculation
    best_g = float(none_tokens / none_t)
    # Speculation beats none only if some request's option earns more than its own cost at the
    # level it must clear (the batch's shared draft passes only add cost): where none does, as
    # at saturation for nearly every step, that is the answer, without the search below.
    level = best_g * (1 + margin)
    if not ((gain - gain[:, :1] > level * own) & (k_of[None, :] <= cap[:, None])).any():
        return SpeculationChoice([0] * n, [False] * n)

    def decide(candidates: np.ndarray, ratios: np.ndarray) -> SpeculationChoice:
        """The best of the candidate choices [C, n] (their goodputs `ratios`), or none."""
        top = int(ratios.argmax())
        pick = candidates[top] if ratios[top] > best_g * (1 + margin + 1e-9) else none
        return SpeculationChoice(k_of[pick].tolist(), (pick > kmax).tolist())

    if n == 1:  # a lone request (light load): every option priced at once, which is exact
        options = np.flatnonzero((k_of <= cap[0]) & ((drafted_of == k_of) | (not uniform)))[:, None]
        return decide(options, goodput(options))
    if uniform:  # k = min(cap_i, m) for every request, for each m
        even = np.minimum(cap[None, :], np.arange(1, kmax + 1)[:, None])
        return decide(even, goodput(even))
    # Every pass count m at once (one row of each array per m): draft options up to m passes,
    # lookup's up to the request's cap whatever m. Options out of reach are -inf once, outside
    # the loop: each Dinkelbach step is then a few numpy calls.
    ms = np.arange(0 if offer_lookup else 1, kmax + 1)
    allowed = (k_of[None, :] <= cap[:, None])[None] & (drafted_of[None, None, :] <= ms[:, None, None])  # [M, n, O]
    allowed_gain = np.where(allowed, gain[None], -np.inf)
    g = np.full(len(ms), best_g)
    choice = np.zeros((len(ms), n), dtype=int)
    done = np.zeros(len(ms), dtype=bool)
    final = np.zeros(len(ms))
    for _ in range(20):
        # Value of each option for each request at level g: E_i(option) - g * (its own cost);
        # argmax takes the first of equal values: k = 0, then the draft model, before lookup.
        new = (allowed_gain - g[:, None, None] * own).argmax(-1)  # [M, n]
        choice = np.where(done[:, None], choice, new)
        g_new = goodput(choice)
        final = np.where(done, final, g_new)  # the goodput of each row's current choice
        converged = g_new <= g * (1 + 1e-12)  # no better level: the choice has converged
        g = np.where(done | converged, g, g_new)
        done |= converged
        if done.all():
            break
    return decide(choice, final)
