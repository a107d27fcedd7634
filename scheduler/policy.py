"""Speculation policies: how many draft tokens (k) each decoding request gets this step."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

from goodspec.scheduler.catchup import CatchUpPricing
from goodspec.scheduler.request import Request
from goodspec.scheduler.step_evidence import StepEvidence

if TYPE_CHECKING:
    from goodspec.scheduler.confidence import VerifyShape
    from goodspec.scheduler.lookup_acceptance import LookupAcceptance
    from goodspec.workers.messages import DraftStop


class SpeculationPolicy(ABC):
    """Chooses k_i >= 0 for each request of a decode batch. The scheduler clips each k_i to
    the request's caps (max_k, remaining tokens, context) before and after asking."""

    name: str
    # Whether it fits a step-time model (the goodput family): a profiling sweep at start-up
    # seeds it through `seed`. The one definition: PolicySpec and PolicyBook ask the policy.
    learns_step_times: bool = False

    def seed(self, records) -> None:
        """Start from profiled step records (a policy that learns step times uses them)."""

    @abstractmethod
    def choose(self, requests: Sequence[Request], caps: Sequence[int]) -> list[int]:
        """k for each request, each in 0..caps[i]. Prompt chunks that may share the step's
        target forward are not offered: they are cut after the choice, in the token budget the
        decodes leave, and a step that carries them is priced as its decodes alone (see
        GoodputPolicy.choose)."""

    def draft_stop(self) -> "DraftStop | None":
        """After `choose`: when the draft may end the drafting of this policy's requests before
        their k, on low confidence (None: never; each drafts its k)."""
        return None

    def trim(self, requests: Sequence[Request], draft_conf: Sequence[Sequence[float]],
             shape: "VerifyShape") -> list[int] | None:
        """After the draft proposed: how many of each request's draft tokens to verify, given
        the draft's confidence in each (None: all of them)."""
        return None

    def observe(self, outcomes: Sequence[tuple[str, int, int]], record) -> None:
        """After each step: (req_id, k, accepted) per decoding request and the StepRecord."""

    def forget(self, req_id: str) -> None:
        """The request finished."""

    def offer_lookup(self, only: bool = False) -> None:
        """Prompt lookup is available beside the draft model (a policy that can choose between
        them starts doing so; the others keep the draft model); `only`: instead of one (every
        speculative token is lookup's)."""

    def uses_lookup(self, req_id: str) -> bool:
        """Whether the last `choose` gave this request prompt lookup's tokens."""
        return False

    @property
    def scores_lookup(self) -> bool:
        """Whether it learns from lookup's proposals scored unverified (observe_lookup): only
        then does the scheduler make them."""
        return False

    def observe_lookup(self, outcomes: Sequence[tuple[str, int, int]]) -> None:
        """(req_id, tokens compared, tokens matched): prompt lookup scored, unverified, against
        the tokens the target committed."""


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


POLICY_NAMES = ("off", "fixed:K", "lookup:K", "goodput", "goodput-uniform", "goodput-conf")
MAX_FIXED_K = 64
MAX_POLICY_CHARS = 32  # longer text is refused before it is looked at


@dataclass(frozen=True)
class PolicySpec:
    """A speculation policy as the server or a request names it, parsed once where the text
    enters (CLI flag, gRPC field) and carried typed from there; `build` makes the policy."""

    kind: Literal["off", "fixed", "lookup", "goodput", "goodput-uniform", "goodput-conf"]
    k: int = 0  # fixed:K and lookup:K only

    @classmethod
    def parse(cls, text: str) -> "PolicySpec":
        """'off', 'fixed:K' / 'lookup:K' (0 <= K <= MAX_FIXED_K) or 'goodput[-uniform|-conf]',
        case and spaces ignored ('FIXED:05 ' is fixed:5); ValueError naming the accepted forms
        otherwise."""
        if len(text) > MAX_POLICY_CHARS:
            raise ValueError(f"a speculation policy is at most {MAX_POLICY_CHARS} characters")
        norm = text.strip().lower()
        if norm in ("off", "goodput", "goodput-uniform", "goodput-conf"):
            return cls(norm)  # type: ignore[arg-type]
        for kind in ("fixed", "lookup"):
            if norm.startswith(kind + ":"):
                digits = norm.split(":", 1)[1]
                if not digits.isdigit() or len(digits) > 4:
                    raise ValueError(f"unknown speculation policy {text!r}: {kind}:K needs an integer K")
                k = int(digits)
                if k > MAX_FIXED_K:
                    raise ValueError(f"{kind}:K needs 0 <= K <= {MAX_FIXED_K}; got {text!r}")
                return cls(kind, k)  # type: ignore[arg-type]
        raise ValueError(f"unknown speculation policy {text!r}; expected one of {', '.join(POLICY_NAMES)}")

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.k}" if self.kind in ("fixed", "lookup") else self.kind

    @property
    def learns_step_times(self) -> bool:
        """Whether the policy it builds learns step times (read from its class: nothing is built)."""
        return self._policy_class().learns_step_times

    def _policy_class(self) -> type[SpeculationPolicy]:
        return {"off": OffPolicy, "fixed": FixedPolicy, "lookup": LookupPolicy, "goodput": GoodputPolicy,
                "goodput-uniform": GoodputPolicy, "goodput-conf": GoodputPolicy}[self.kind]

    def build(self) -> SpeculationPolicy:
        """A new policy object; its `name` is this spec's."""
        cls = self._policy_class()
        if cls is GoodputPolicy:
            return GoodputPolicy(uniform=self.kind == "goodput-uniform", confidence=self.kind == "goodput-conf")
        return cls() if cls is OffPolicy else cls(self.k)


class LookupPolicy(FixedPolicy):
    """K prompt-lookup tokens for every request (where the server offers lookup: proposer
    auto): the static baseline of the second proposer."""

    def __init__(self, k: int) -> None:
        super().__init__(k)
        self.name = f"lookup:{k}"
        self._offered = False

    def offer_lookup(self, only: bool = False) -> None:
        self._offered = True

    def uses_lookup(self, req_id: str) -> bool:
        return self._offered


class GoodputPolicy(SpeculationPolicy):
    """Chooses k per request to maximise predicted goodput (see goodspec.scheduler.goodput).
    Until the step-time model has been fitted (profiling sweep or live steps), it uses
    `warmup_k` so the model sees speculative steps to learn from."""

    name = "goodput"
    learns_step_times = True

    def __init__(self, refit_every: int = 16, warmup_k: int = 2, uniform: bool = False,
                 confidence: bool = False, stop_drafting: bool = True) -> None:
        """`confidence`: adaptive verification (goodput-conf); with it, `stop_drafting` lets the
        draft stop each request on low confidence (DraftStop) instead of drafting its k."""
        from goodspec.scheduler.confidence import ConfidenceCalibrator
        from goodspec.scheduler.goodput import AcceptanceEstimator
        from goodspec.scheduler.step_time import StepTimeModel

        self.time_model = StepTimeModel()
        self.acceptance = AcceptanceEstimator()
        # With prompt lookup offered (offer_lookup): its own acceptance, learned from its
        # verifications and from its proposals scored against what the target committed, per
        # class of proposal (goodspec.scheduler.lookup_acceptance).
        self.lookup_acceptance: LookupAcceptance | None = None
        self._lookup_ids: set[str] = set()  # the requests the last choose gave lookup
        self.refit_every = refit_every
        self.warmup_k = warmup_k
        self.uniform = uniform  # one k for the whole batch (SmartSpec's choice), for A/B
        self.lookup_only = False  # no draft model: lookup proposes every token (proposer ngram)
        if uniform:
            self.name = "goodput-uniform"
        # Adaptive verification (goodspec.scheduler.confidence): verify only the slots whose
        # calibrated survival is worth their verify time.
        self.calibrator = ConfidenceCalibrator() if confidence else None
        if confidence:
            self.name = "goodput-conf"
        self._verifying: dict[str, tuple[list[float], bool]] = {}  # req_id -> (confidences, greedy)
        self._stop: DraftStop | None = None  # this step's, with the calibrator (goodput-conf)
        self.stop_drafting = confidence and stop_drafting
        self._level: float | None = None  # the last step's goodput level (tokens per second)
        self._records: list = []  # live steps
        self._profile: list = []  # the start-up sweep
        self._since_fit = 0
        self.explore_every = 50  # an occasional speculative step keeps alpha estimates alive
        # Until this many speculative verifications were seen, the global acceptance is the
        # prior's 0.5, which made a new engine choose k = 0 and learn nothing until an
        # exploration step (50 steps of no speculation where it paid): speculate to measure.
        self.min_observations = 16
        self._observations = 0
        self._steps = 0
        self._predicted: float | None = None
        self.catchup = CatchUpPricing()  # what a draft's catch-up is charged to the step that pays it
        # its predictions against the steps' times, and the margin drawn from them
        self.evidence = StepEvidence()

    @property
    def prediction_log(self) -> list[tuple[float, float]]:
        """(predicted, measured) seconds of the pure decode steps it chose (for the stats)."""
        return self.evidence.prediction_log

    def seed(self, records) -> None:
        """Start from profiled step records (taken at start-up or loaded from the cache)."""
        self._profile = list(records)
        self.time_model.fit(self._records, prior=self._profile)

    def offer_lookup(self, only: bool = False) -> None:
        from goodspec.scheduler.lookup_acceptance import LookupAcceptance

        # The batch-uniform variant keeps one proposer, as SmartSpec (lookup, when it is the only one).
        if not self.uniform or only:
            self.lookup_acceptance = LookupAcceptance()
        self.lookup_only = only

    def uses_lookup(self, req_id: str) -> bool:
        return req_id in self._lookup_ids

    @property
    def scores_lookup(self) -> bool:
        return self.lookup_acceptance is not None

    def observe_lookup(self, outcomes) -> None:
        if self.lookup_acceptance is not None:
            self.lookup_acceptance.observe_many(outcomes)

    def choose(self, requests: Sequence[Request], caps: Sequence[int]) -> list[int]:
        from goodspec.scheduler.goodput import best_choice

        self._steps += 1
        self._stop = None
        ids = [r.req_id for r in requests]
        self._lookup_ids = set(ids) if self.lookup_only else set()
        if self.lookup_acceptance is not None:  # which lookup estimator each request's evidence feeds
            self.lookup_acceptance.classify(requests)
        if not self.time_model.ready or self._observations < self.min_observations:
            return [min(self.warmup_k, c) for c in caps]
        if not self.time_model.fits_batch(len(requests)):
            # Fitted around another batch size (refits follow the steps, every refit_every): a
            # batch that jumped, as a burst of arrivals makes it, was priced by the fit for the
            # old one. A closed batch of 24 on the real pair, after a run whose batch drained to
            # 1: six steps of k = 1 for all 24 (fixed:1 ran at 0.91x of `off` in that run) until
            # the next refit (BENCHMARKS.md, thirty-third session).
            self._refit(len(requests))
        kmax = max(caps, default=0)
        contexts = [len(r.token_ids) for r in requests]
        if self.lookup_only:  # one proposer, priced like the draft model but with nothing to draft
            gains = self.lookup_acceptance.expected_tokens(ids, kmax)
            ks = best_choice(None, contexts, caps, self.time_model, None, gains=gains, uniform=self.uniform,
                             margin=self.evidence.margin).ks
            self._predicted = self.time_model.predict_step_time(ks, contexts, None, [True] * len(ks))
            return ks
        # A step that carries prompt chunks is priced as the same decodes alone (choose is not
        # told of them): its own goodput is low, so beside the chunk any draft token looked
        # cheap, and a floor at the decode steps' measured goodput still let goodput draft ~20
        # tokens into each chunk step at 32 req/s (those steps took 1030-1180 ms against `off`'s
        # 865-948; its servers 4-10% behind `off`'s). No speculation there at all matched `off`
        # at 32 req/s but was 6-9% slower at 2, where decodes still gain from it (BENCHMARKS.md,
        # twenty-seventh session): priced as the decodes alone, the chunk step speculates as
        # they would.
        gains = self.acceptance.expected_tokens(ids, kmax)
        # Tokens the draft would first have to catch up on (beyond the pending one): the whole
        # prompt for a new request, the tokens decoded without speculation after a k = 0 stretch.
        catchups = [max(0, len(r.token_ids) - r.draft_len - 1) for r in requests]
        spread = self.catchup.spread(catchups, [r.sampling.max_new_tokens - r.num_output for r in requests],
                                     [float(gains[i, c]) for i, c in enumerate(caps)])
        lookup_gains = None
        if self.lookup_acceptance is not None:
            lookup_gains = self.lookup_acceptance.expected_tokens(ids, kmax)
        choice = best_choice(None, contexts, caps, self.time_model, spread, gains=gains, uniform=self.uniform,
                             lookup_gains=lookup_gains, margin=self.evidence.margin)
        ks, lookup = choice.ks, choice.lookup
        if not any(ks) and self._steps % self.explore_every == 0:
            ks, lookup = self._explore(catchups, caps), [False] * len(ks)
        else:
            self.catchup.count(catchups, caps, ks, lookup)
        self._lookup_ids = {i for i, lk in zip(ids, lookup) if lk}
        self._predicted = self.time_model.predict_step_time(ks, contexts, catchups, lookup)
        if self.stop_drafting and any(k > 0 and not lk for k, lk in zip(ks, lookup)):
            emitted = [lookup_gains[i, k] if lk else gains[i, k] for i, (k, lk) in enumerate(zip(ks, lookup))]
            ks = self._draft_ahead(ks, lookup, caps, float(sum(emitted)) / max(self._predicted, 1e-9), max(contexts))
        return ks

    DRAFT_AHEAD = 2  # goodput-conf: positions the draft may go past the chosen k where it is confident

    def _draft_ahead(self, ks: list[int], lookup: list[bool], caps: Sequence[int], level: float,
                     longest: int) -> list[int]:
        """Adaptive drafting (goodput-conf): each drafted request may go DRAFT_AHEAD positions
        past its k, and the draft stops each where the calibrated chance that the next position
        is accepted no longer pays for that position at this step's goodput `level` (tokens per
        second): DraftStop. The chosen k prices the average request; the confidences tell this
        one's. Measured (BENCHMARKS.md, twenty-third session): without it goodput-conf drafted
        4.5 tokens a batch-1 step to verify 2.9; with it 2.4 to verify 2.3, 2-8% faster in
        process, level over Ray, and no faster than plain goodput either way."""
        from goodspec.workers.messages import DraftStop

        cd, cv = self.time_model.draft.coef, self.time_model.verify.coef
        row_s = cv[2] + cd[2] + cd[3] * longest / 1000.0  # one more token of one request: drafted, verified
        cal = self.calibrator
        self._stop = DraftStop((tuple(cal.rates(True).tolist()), tuple(cal.rates(False).tolist())),
                               (cal.mean_rate(True), cal.mean_rate(False)), float(level * row_s), float(level * cd[1]))
        return [min(c, k + self.DRAFT_AHEAD) if k > 0 and not lk else k for k, lk, c in zip(ks, lookup, caps)]

    def draft_stop(self) -> "DraftStop | None":
        return self._stop

    @staticmethod
    def _explore(catchups: Sequence[int], caps: Sequence[int]) -> list[int]:
        """One draft token for the one request whose draft is furthest along: a measurement,
        not a bet. (k = 1 for every request made the draft first catch up on every token it had
        skipped, whole prompts included: at saturation on the mixed workload goodput trailed
        off by 6.2% with that, by 1.4% with this.)"""
        ks = [0] * len(caps)
        open_ = [i for i, c in enumerate(caps) if c > 0]
        if open_:
            ks[min(open_, key=lambda i: catchups[i])] = 1
        return ks

    def trim(self, requests, draft_conf, shape) -> list[int] | None:
        from goodspec.scheduler.confidence import verify_lengths

        if self.calibrator is None or not self.time_model.ready:
            return None
        greedy = [r.sampling.temperature <= 0 for r in requests]
        survival = [self.calibrator.survival(c, g) for c, g in zip(draft_conf, greedy)]
        lengths, self._level = verify_lengths(survival, greedy, shape, self.time_model, self._level)
        for r, c, g, n in zip(requests, draft_conf, greedy, lengths):
            self._verifying[r.req_id] = (list(c[:n]), g)
        return lengths

    def observe(self, outcomes, record) -> None:
        drafted, looked_up = [], []
        for req_id, k, accepted in outcomes:
            if req_id in self._lookup_ids:
                looked_up.append((req_id, k, accepted))
                drafted.append((req_id, 0, 0))  # no evidence on the draft this step
            else:
                drafted.append((req_id, k, accepted))
            self._observations += k > 0
        self.acceptance.observe_many(drafted)
        if looked_up:
            self.lookup_acceptance.observe_many(looked_up)
        if self.calibrator is not None:
            for req_id, k, accepted in outcomes:
                if req_id in self._verifying:
                    conf, greedy = self._verifying.pop(req_id)
                    if len(conf) == k:  # else the cut's step never verified (a worker was lost)
                        self.calibrator.observe(conf, accepted, greedy)
        self.evidence.log(self._predicted, record)
        self._predicted = None
        self._records.append(record)
        if len(self._records) > 4 * self.time_model.window:
            del self._records[: -self.time_model.window]
        self._since_fit += 1
        # Refit often while live data is scarce, then every refit_every steps.
        every = 4 if len(self._records) < 128 else self.refit_every
        if self._since_fit >= every or not self.time_model.ready:
            self._refit(record.batch_size)
            self.evidence.update()

    def _refit(self, around: int) -> None:
        self.time_model.fit(self._records, prior=self._profile, around=around)
        self._since_fit = 0

    def forget(self, req_id: str) -> None:
        self.acceptance.forget(req_id)
        if self.lookup_acceptance is not None:
            self.lookup_acceptance.forget(req_id)
        self._lookup_ids.discard(req_id)
        self._verifying.pop(req_id, None)
