"""Which speculation policy each request follows, and the policies' view of every step."""

from __future__ import annotations

from typing import Sequence

from goodspec.scheduler.confidence import VerifyShape
from goodspec.scheduler.errors import RequestRejected
from goodspec.scheduler.plan import StepPlan
from goodspec.scheduler.policy import PolicySpec, SpeculationPolicy
from goodspec.scheduler.request import Request
from goodspec.scheduler.step_record import StepRecord
from goodspec.workers.messages import DraftStop, Proposal


class PolicyBook:
    """The server's policy and one shared instance per distinct per-request `PolicySpec` (so
    every 'goodput' request shares one learned model: the server's own when the specs match).
    At most one entry per spec, and specs are bounded (fixed:K has K <= MAX_FIXED_K)."""

    def __init__(self, server: SpeculationPolicy, lookup: bool = False, lookup_only: bool = False) -> None:
        """`lookup`: prompt lookup is on beside the draft model; the policies that can choose
        between the two (goodput) are told so. `lookup_only`: there is no draft model, every
        speculative token comes from prompt lookup (proposer ngram)."""
        self.server = server
        self.lookup = lookup or lookup_only
        self.lookup_only = lookup_only
        self._by_name: dict[str, SpeculationPolicy] = {}
        self.profile_records: list[StepRecord] = []  # the start-up sweep, seeds goodput policies
        if self.lookup:
            server.offer_lookup(only=lookup_only)

    def resolve(self, spec: PolicySpec | SpeculationPolicy | None) -> SpeculationPolicy:
        """The policy a request with this spec follows (None: the server's). A policy object
        (in-process callers, tests) is followed as it is."""
        if isinstance(spec, SpeculationPolicy):
            return spec
        if spec is None or spec.name == self.server.name:
            return self.server
        if spec.kind == "lookup" and not self.lookup:
            raise RequestRejected(f"policy {spec.name} needs prompt lookup, which this server does not offer "
                                  f"(start it with proposer auto)")
        if spec.name not in self._by_name:
            policy = spec.build()
            if self.lookup:
                policy.offer_lookup(only=self.lookup_only)
            if policy.learns_step_times and self.profile_records:
                policy.seed(self.profile_records)
            self._by_name[spec.name] = policy
        return self._by_name[spec.name]

    def all(self) -> list[SpeculationPolicy]:
        return [self.server, *self._by_name.values()]

    def learning(self) -> list[SpeculationPolicy]:
        """The policies that learn from profiled steps (goodput)."""
        return [p for p in self.all() if p.learns_step_times]

    def seed(self, records: list[StepRecord]) -> None:
        self.profile_records = list(records)
        for policy in self.learning():
            policy.seed(self.profile_records)

    def choose(self, decode: Sequence[Request],
               caps: Sequence[int]) -> tuple[list[int], DraftStop | None, set[str]]:
        """k per decoding request, each policy asked once for all of its requests, clipped to
        the caps; and when the draft may stop some of them early (one policy's DraftStop, and
        the requests it covers: the draft takes one per proposal)."""
        ks = [0] * len(decode)
        stop, stoppable = None, set()
        groups: dict[int, tuple[SpeculationPolicy, list[int]]] = {}
        for i, r in enumerate(decode):
            groups.setdefault(id(r.policy), (r.policy, []))[1].append(i)
        for policy, idx in groups.values():
            chosen = policy.choose([decode[i] for i in idx], [caps[i] for i in idx])
            for i, k in zip(idx, chosen):
                ks[i] = max(0, min(int(k), caps[i]))
            own = policy.draft_stop()
            if own is not None and stop is None:
                stop, stoppable = own, {decode[i].req_id for i in idx}
        return ks, stop, stoppable

    def uses_lookup(self, r: Request) -> bool:
        """Whether the request's k tokens this step come from prompt lookup (its policy's choice
        in the last `choose`)."""
        return self.lookup_only or (self.lookup and r.policy.uses_lookup(r.req_id))

    def observe_lookup(self, outcomes: Sequence[tuple[str, int, int]], plan: StepPlan) -> None:
        """(req_id, tokens compared, tokens matched) of prompt lookup scored against the target's
        committed tokens for requests that did not use it: the server's policy and each
        request's own learn from them."""
        if not outcomes:
            return
        own = {r.req_id: r.policy for r in plan.verify_reqs}
        self.server.observe_lookup(outcomes)
        by_policy: dict[int, tuple[SpeculationPolicy, list]] = {}
        for outcome in outcomes:
            policy = own.get(outcome[0], self.server)
            if policy is not self.server:
                by_policy.setdefault(id(policy), (policy, []))[1].append(outcome)
        for policy, seen in by_policy.values():
            policy.observe_lookup(seen)

    def trim(self, plan: StepPlan, proposal: Proposal, draft_time: float) -> None:
        """Let each policy cut its requests' proposals to what is worth verifying (adaptive
        verification); the cut tokens are never sent to the target."""
        if proposal.draft_conf is None:
            return
        groups: dict[int, tuple[SpeculationPolicy, list]] = {}
        for item, r in zip(plan.verify, plan.verify_reqs):
            if item.draft_ids and r.req_id not in plan.lookup:  # lookup has no confidence to cut by
                groups.setdefault(id(r.policy), (r.policy, []))[1].append((item, r))
        if not groups:
            return
        # Priced as the step's decodes alone, as goodput's choice of k is (GoodputPolicy.choose):
        # beside a prompt chunk's fixed cost any verified token looks cheap.
        decodes = [it for it, r in zip(plan.verify, plan.verify_reqs) if r.req_id in plan.ks]
        shape = VerifyShape(
            num_items=len(decodes), tokens=sum(len(it.token_ids) for it in decodes),
            emitting=sum(it.sample for it in decodes),
            longest=max(it.start_pos + len(it.token_ids) for it in decodes), draft_time=draft_time)
        for policy, members in groups.values():
            lengths = policy.trim([r for _, r in members],
                                  [proposal.draft_conf[it.proposal_row] for it, _ in members], shape)
            for (item, _), n in zip(members, lengths or ()):
                item.draft_ids = item.draft_ids[:n]

    def observe(self, outcomes: Sequence[tuple[Request, int, int]], record: StepRecord) -> None:
        """(request, k, accepted) per decoding request: the server's policy sees every outcome
        (its acceptance estimates cover the whole pair), another policy those of its own."""
        by_policy: dict[int, tuple[SpeculationPolicy, list]] = {id(self.server): (self.server, [])}
        for r, k, accepted in outcomes:
            outcome = (r.req_id, k, accepted)
            by_policy[id(self.server)][1].append(outcome)
            if r.policy is not self.server:
                by_policy.setdefault(id(r.policy), (r.policy, []))[1].append(outcome)
        for policy, seen in by_policy.values():
            policy.observe(seen, record)

    def forget(self, r: Request) -> None:
        self.server.forget(r.req_id)
        if r.policy is not self.server:
            r.policy.forget(r.req_id)
