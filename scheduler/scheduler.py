"""Scheduler: continuous batching with speculation, one step at a time.

A step is: schedule (admit, preempt, chunk prefills, ask the policies for k and, with prompt
lookup on, for each request's proposer) -> one propose call to the draft worker (only if some
request drafts with it; goodspec.scheduler.proposers) -> one verify call to the target worker
-> commit.

Invariant kept at the top of every step: for each running request, `target_len` and `draft_len`
equal the lengths of its caches in the workers, both <= len(token_ids) - 1 once it has output, and
the blocks they occupy fit the workers' KV budgets. The scheduler never touches a tensor, and is
single-threaded: one thread owns it (goodspec.scheduler.service).
"""

from __future__ import annotations

import random
import time
from collections import Counter, deque
from dataclasses import replace
from typing import Protocol

from goodspec.scheduler.config import KVBudget, SchedulerConfig
from goodspec.scheduler.errors import EngineUnhealthy, RequestRejected, WorkerGone, WorkerLost
from goodspec.scheduler.kv_planner import KVPlanner
from goodspec.scheduler.plan import RequestOutput, StepPlan
from goodspec.scheduler.policy import OffPolicy, PolicySpec, SpeculationPolicy
from goodspec.scheduler.policy_book import PolicyBook
from goodspec.scheduler.proposers import Proposers
from goodspec.scheduler.request import FinishReason, Request, RequestStatus
from goodspec.scheduler.step_record import StepRecord
from goodspec.workers.messages import ProposeBatch, Proposal, VerifyBatch, VerifyItem, VerifyResult
from goodspec.workers.sampling import SamplingParams


class DraftBackend(Protocol):
    def propose(self, batch: ProposeBatch) -> Proposal: ...
    def free(self, req_ids: list[str]) -> None: ...


class TargetBackend(Protocol):
    def verify(self, batch: VerifyBatch) -> VerifyResult: ...
    def free(self, req_ids: list[str]) -> None: ...


MAX_STEP_RECORDS = 20_000  # then the oldest half is dropped


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        target: TargetBackend,
        target_kv: KVBudget,
        draft: DraftBackend | None = None,
        draft_kv: KVBudget | None = None,
        policy: SpeculationPolicy | None = None,
        stop_checker=None,
        lookup: bool = False,
    ) -> None:
        """`lookup`: prompt lookup beside the draft model, the policy choosing per request; with
        no draft model, prompt lookup proposes for every request (proposer ngram)."""
        self.proposers = Proposers(draft, lookup=lookup)
        if draft is not None and draft_kv is None:
            raise ValueError("a draft worker needs its KV budget")
        self.config = config
        self.target, self.draft = target, draft
        self.kv = KVPlanner(target_kv, draft_kv)
        self.policies = PolicyBook(policy or OffPolicy(), lookup=lookup, lookup_only=lookup and draft is None)
        self.stop_checker = stop_checker  # callable(output_ids, stop strings, num_new) -> cut index or None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.step_records: list[StepRecord] = []  # the recent ones (MAX_STEP_RECORDS at most)
        # k -> request-steps over every step since the start: what a client diffs across a run
        # (the records and the stats' k_histogram cover recent steps only)
        self.k_totals: Counter[int] = Counter()
        self.num_steps = 0  # every step since the start (step_records keeps the recent ones)
        self._aborted: list[str] = []
        self._rng = random.Random()
        self._failures = {"draft": 0, "target": 0}
        self.unhealthy: str | None = None  # why, once the engine gave up
        self.num_worker_failures = 0

    @property
    def policy(self) -> SpeculationPolicy:
        """The server's policy (a request without a spec of its own follows it)."""
        return self.policies.server

    # -- requests --------------------------------------------------------------------------------
    def add_request(
        self,
        req_id: str,
        prompt_ids: list[int],
        sampling: SamplingParams,
        policy: PolicySpec | SpeculationPolicy | None = None,
        max_k: int | None = None,
    ) -> Request:
        if self.unhealthy is not None:
            raise EngineUnhealthy(self.unhealthy)
        if req_id in self.requests:
            raise RequestRejected(f"request_id {req_id!r} is already in use")
        if not prompt_ids:
            raise RequestRejected("prompt is empty")
        if len(prompt_ids) >= self.config.max_context:
            raise RequestRejected(
                f"prompt has {len(prompt_ids)} tokens; the model's context is {self.config.max_context}"
            )
        if max_k is not None and max_k < 0:
            raise RequestRejected(f"max_k must be >= 0; got {max_k}")
        need = min(len(prompt_ids) + sampling.max_new_tokens, self.config.max_context) + self.config.max_k
        if (why := self.kv.too_large(need)) is not None:
            raise RequestRejected(why)
        if sampling.seed is None:
            sampling = replace(sampling, seed=self._rng.getrandbits(63))
        req = Request(req_id, list(prompt_ids), sampling, policy=self.policies.resolve(policy), max_k=max_k)
        self.requests[req_id] = req
        self.waiting.append(req)
        return req

    def abort(self, req_id: str) -> bool:
        """Cancel a request now: it leaves the batch and both caches free its blocks at once."""
        req = self.requests.get(req_id)
        if req is None or req.status == RequestStatus.FINISHED:
            return False
        self._finish(req, FinishReason.CANCELLED)
        self._aborted.append(req_id)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def has_work(self) -> bool:
        """Something for step() to do: requests to run, or cancellations to report."""
        return bool(self.waiting or self.running or self._aborted)

    def pop_finished(self, req_id: str) -> Request:
        return self.requests.pop(req_id)

    # -- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t_start = time.perf_counter()
        outputs = [RequestOutput(r, [], True, FinishReason.CANCELLED) for r in self._aborted]
        self._aborted.clear()
        if self.unhealthy is not None:
            return outputs
        plan = self._schedule()
        if not plan.verify:
            return outputs
        try:
            proposal, t_draft = self.proposers.propose(plan)
            self._failures["draft"] = 0
        except WorkerLost as e:
            outputs += self._worker_lost("draft", e)
            if self.unhealthy is not None:
                return outputs
            proposal, t_draft = None, 0.0  # verify this step without drafts
            for item in plan.verify:
                item.draft_ids, item.proposal_row = [], -1
        if proposal is not None:
            t0 = time.perf_counter()
            self.policies.trim(plan, proposal, t_draft)
            plan.choose_time += time.perf_counter() - t0  # deciding what to verify is choosing too
        batch = VerifyBatch(plan.verify, proposal, self.proposers.reads_features, self.proposers.feature_layers)
        t0 = time.perf_counter()
        try:
            result = self.target.verify(batch)
            self._failures["target"] = 0
        except WorkerLost as e:
            return outputs + self._worker_lost("target", e)
        t_verify = time.perf_counter() - t0
        self.proposers.keep_features(plan, result)
        self.policies.observe_lookup(self.proposers.shadow_outcomes(plan, result), plan)
        outputs += self._commit(plan, result)
        record = plan.record(proposal, result, t_draft, t_verify, time.perf_counter() - t_start)
        self.step_records.append(record)
        self.k_totals.update(record.ks)
        self.num_steps += 1
        if len(self.step_records) > MAX_STEP_RECORDS:
            del self.step_records[:MAX_STEP_RECORDS // 2]
        self.policies.observe(plan.decode_outcomes(result), record)
        for r in plan.finished:  # after observe: it would bring their per-request state back
            self.policies.forget(r)
        return outputs

    def _schedule(self) -> StepPlan:
        cfg = self.config
        self._admit()
        # Decode requests first (oldest first), then prefill chunks in the remaining token budget.
        decode = [r for r in self.running if r.in_decode]
        prefill = [r for r in self.running if not r.in_decode]
        caps = [self._k_cap(r) for r in decode]
        t0 = time.perf_counter()
        self.proposers.score_ahead([(r, c) for r, c in zip(decode, caps) if r.policy.scores_lookup])
        # (the chunks are not offered to the policies: a step is priced as its decodes alone)
        ks, draft_stop, may_stop = self.policies.choose(decode, caps)
        lookup = {r.req_id for r, k in zip(decode, ks) if k > 0 and self.policies.uses_lookup(r)}
        choose_time = time.perf_counter() - t0
        budget = cfg.max_num_batched_tokens - sum(1 + k for k in ks)
        chunks: dict[str, int] = {}
        for r in prefill:
            if budget <= 0:
                break
            n = min(r.num_pending, budget)
            chunks[r.req_id] = n
            budget -= n
        ks_by_id = {r.req_id: k for r, k in zip(decode, ks)}
        ks_by_id = self._fit_kv(ks_by_id, chunks, lookup)

        plan = StepPlan(ks=ks_by_id, choose_time=choose_time, lookup=lookup, draft_stop=draft_stop,
                        may_stop=may_stop)
        for r in self.running:
            if r.req_id in ks_by_id:
                tokens = r.token_ids[r.target_len:]
                plan.verify.append(VerifyItem(r.req_id, r.target_len, tokens, True, r.sampling))
            elif r.req_id in chunks:
                n = chunks[r.req_id]
                end = r.target_len + n
                tokens = r.token_ids[r.target_len:end]
                plan.verify.append(
                    VerifyItem(r.req_id, r.target_len, tokens, end == len(r.token_ids), r.sampling)
                )
            else:
                continue
            plan.verify_reqs.append(r)
        return plan

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if not self.kv.can_admit(req, self.running, self._uses_draft(req)):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)

    def _uses_draft(self, req: Request) -> bool:
        return not isinstance(req.policy, OffPolicy) and req.max_k != 0

    def _k_cap(self, r: Request) -> int:
        if self.draft is None and not self.proposers.lookup:
            return 0
        cap = self.config.max_k if r.max_k is None else min(r.max_k, self.config.max_k)
        remaining = r.sampling.max_new_tokens - r.num_output
        # A step emits up to k + 1 tokens; the target may not run past its context.
        return max(0, min(cap, remaining - 1, self.config.max_context - len(r.token_ids)))

    def _fit_kv(self, ks: dict[str, int], chunks: dict[str, int], lookup: set[str]) -> dict[str, int]:
        """Shrink the step until it fits both KV budgets: first drop speculation, then preempt
        the newest running requests (they are recomputed later with the same output)."""
        while True:
            if self.kv.fits(self.running, ks, chunks, lookup):
                return ks
            if any(ks.values()):
                ks = {rid: 0 for rid in ks}
                continue
            if len(self.running) <= 1:
                # One request alone always fits: add_request checked it against the whole budget.
                raise RuntimeError("KV accounting error: a lone request does not fit")
            victim = self.running[-1]
            self._preempt(victim)
            ks.pop(victim.req_id, None)
            chunks.pop(victim.req_id, None)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._free_workers([req.req_id])
        req.reset_caches()
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def _commit(self, plan: StepPlan, result: VerifyResult) -> list[RequestOutput]:
        now = time.monotonic()
        outputs: list[RequestOutput] = []
        for item, r, accepted, new_ids in zip(
            plan.verify, plan.verify_reqs, result.num_accepted, result.output_ids
        ):
            r.target_len = item.start_pos + len(item.token_ids) + accepted
            if not item.sample:
                continue
            if item.draft_ids or r.req_id in plan.ks:
                r.num_spec_steps += 1
                r.sum_k += len(item.draft_ids)
                r.num_draft_proposed += len(item.draft_ids)
                r.num_draft_accepted += accepted
                if r.req_id in plan.lookup:
                    r.num_lookup_proposed += len(item.draft_ids)
                    r.num_lookup_accepted += accepted
            if r.first_token_time is None:
                r.first_token_time = now
            emitted, reason = self._append_until_finished(r, new_ids)
            r.draft_len = min(r.draft_len, len(r.token_ids) - 1)
            if reason is not None:
                self._finish(r, reason, forget=False)
                plan.finished.append(r)
            outputs.append(RequestOutput(r.req_id, emitted, reason is not None, reason))
        return outputs

    def _append_until_finished(self, r: Request, new_ids: list[int]) -> tuple[list[int], FinishReason | None]:
        eos = self.config.eos_token_id
        emitted: list[int] = []
        reason = None
        for tok in new_ids:
            r.token_ids.append(tok)
            emitted.append(tok)
            if eos is not None and tok == eos and not r.sampling.ignore_eos:
                reason = FinishReason.EOS
            elif r.num_output >= r.sampling.max_new_tokens or len(r.token_ids) >= self.config.max_context:
                reason = FinishReason.LENGTH
            if reason is not None:
                break
        if r.sampling.stop and self.stop_checker is not None:
            cut = self.stop_checker(r.output_ids, r.sampling.stop, len(emitted))
            if cut is not None:
                drop = r.num_output - cut
                del r.token_ids[len(r.token_ids) - drop:]
                emitted = emitted[: max(0, len(emitted) - drop)]
                reason = FinishReason.STOP
        return emitted, reason

    def _worker_lost(self, which: str, err: Exception) -> list[RequestOutput]:
        """Its caches are gone: every running request recomputes them from position 0 (for the
        target, re-prefill; for the draft, catch-up on its next proposal). Output is unchanged
        because sampling depends only on (seed, position)."""
        self.num_worker_failures += 1
        self._failures[which] += 1
        for r in self.running:
            if which == "target":
                r.target_len = 0
                # Nothing was committed: the draft tokens proposed this step are void too.
                r.draft_len = min(r.draft_len, len(r.token_ids) - 1)
            else:
                r.draft_len = 0
        if isinstance(err, WorkerGone):
            self.unhealthy = f"the {which} worker is gone for good: {err}"
        elif self._failures[which] < self.config.max_worker_failures:
            return []
        else:
            self.unhealthy = f"the {which} worker failed {self._failures[which]} times in a row: {err}"
        return self.fail_all(self.unhealthy)

    def fail_all(self, why: str) -> list[RequestOutput]:
        """End every unfinished request with an error that says why (caches are not freed: the
        engine is giving up, and a dead worker has nothing to free)."""
        outputs = []
        for r in list(self.running) + list(self.waiting):
            r.error = why
            self._finish(r, FinishReason.ERROR, free=False)
            outputs.append(RequestOutput(r.req_id, [], True, FinishReason.ERROR))
        return outputs

    def _finish(self, r: Request, reason: FinishReason, free: bool = True, forget: bool = True) -> None:
        if r.status == RequestStatus.RUNNING:
            self.running.remove(r)
            if free:
                self._free_workers([r.req_id])
        elif r.status == RequestStatus.WAITING:
            self.waiting.remove(r)
        r.status = RequestStatus.FINISHED
        r.finish_reason = reason
        if forget:
            self.policies.forget(r)
        r.finish_time = time.monotonic()

    def _free_workers(self, req_ids: list[str]) -> None:
        # A worker that is down has nothing to free: its caches went with it.
        for worker in (self.target, self.draft):
            if worker is None:
                continue
            try:
                worker.free(req_ids)
            except WorkerLost:
                pass
