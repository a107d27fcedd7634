"""Scheduler: continuous batching with speculation, one step at a time.

A step is: schedule (admit, preempt, chunk prefills, ask the policy for k) -> one propose call to
the draft worker (only if some k > 0) -> one verify call to the target worker -> commit.

Invariant kept at the top of every step: for each running request, `target_len` and `draft_len`
equal the lengths of its caches in the workers, both <= len(token_ids) - 1 once it has output, and
the blocks they occupy fit the workers' KV budgets. The scheduler never touches a tensor.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from goodspec.scheduler.policy import OffPolicy, SpeculationPolicy
from goodspec.scheduler.request import FinishReason, Request, RequestStatus
from goodspec.scheduler.step_record import StepRecord
from goodspec.workers.messages import (
    ProposeBatch, ProposeItem, Proposal, VerifyBatch, VerifyItem, VerifyResult,
)
from goodspec.workers.sampling import SamplingParams


class DraftBackend(Protocol):
    def propose(self, batch: ProposeBatch) -> Proposal: ...
    def free(self, req_ids: list[str]) -> None: ...


class TargetBackend(Protocol):
    def verify(self, batch: VerifyBatch) -> VerifyResult: ...
    def free(self, req_ids: list[str]) -> None: ...


class RequestRejected(ValueError):
    """The request can never be served with this configuration (bad input or too large)."""


class WorkerLost(RuntimeError):
    """A worker call failed because the worker died, hung past its timeout, or came back
    without the caches it had (restarted). Raised by the transport in goodspec.cluster."""


class WorkerGone(WorkerLost):
    """The worker died and will not come back (its restarts are used up): no point retrying."""


class EngineUnhealthy(RuntimeError):
    """A worker kept failing and could not be brought back; the engine serves nothing more."""


@dataclass(frozen=True)
class KVBudget:
    num_blocks: int
    block_size: int

    def blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = _f(32, "requests running at once (the decode batch size limit)")
    max_num_batched_tokens: int = _f(512, "tokens per target forward; bounds prefill chunks")
    max_k: int = _f(8, "K_max: the most draft tokens a request gets in one step")
    max_context: int = _f(1024, "context limit (capped by the models' own)")
    eos_token_id: int | None = _f(None, "end-of-sequence id (default: the tokenizer's)")
    max_worker_failures: int = _f(3, "consecutive failed worker calls before the engine gives up")

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1; got {self.max_num_seqs}")
        if self.max_k < 0:
            raise ValueError(f"max_k must be >= 0; got {self.max_k}")
        if self.max_num_batched_tokens < self.max_num_seqs * (self.max_k + 1):
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs * (max_k + 1) = {self.max_num_seqs * (self.max_k + 1)} so a full "
                f"decode batch fits one step"
            )


@dataclass
class RequestOutput:
    """What one step produced for one request: its new tokens, and whether it finished."""

    req_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None = None


@dataclass
class _Plan:
    verify: list[VerifyItem] = field(default_factory=list)
    verify_reqs: list[Request] = field(default_factory=list)
    ks: dict[str, int] = field(default_factory=dict)
    draft_catchup: int = 0


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
    ) -> None:
        self.draft_stateless = bool(getattr(draft, "stateless", False))
        if draft is not None and draft_kv is None and not self.draft_stateless:
            raise ValueError("a draft worker with a KV cache needs its KV budget")
        self.config = config
        self.target, self.draft = target, draft
        self.target_kv, self.draft_kv = target_kv, draft_kv
        self.policy: SpeculationPolicy = policy or OffPolicy()
        self.stop_checker = stop_checker  # callable(output_ids, stop strings) -> cut index or None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.step_records: list[StepRecord] = []
        self._aborted: list[str] = []
        self._rng = random.Random()
        self._failures = {"draft": 0, "target": 0}
        self._policies: dict[str, SpeculationPolicy] = {}
        self.profile_records: list[StepRecord] = []  # the start-up sweep, seeds goodput policies
        self.unhealthy: str | None = None  # why, once the engine gave up
        self.num_worker_failures = 0

    # -- requests --------------------------------------------------------------------------------
    def add_request(
        self,
        req_id: str,
        prompt_ids: list[int],
        sampling: SamplingParams,
        policy: SpeculationPolicy | None = None,
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
        for name, kv in (("target", self.target_kv), ("draft", self.draft_kv)):
            if kv is not None and kv.blocks(need) > kv.num_blocks:
                raise RequestRejected(
                    f"request needs up to {need} tokens of {name} KV cache but the whole budget is "
                    f"{kv.tokens} tokens; shorten the prompt or max_new_tokens, or raise kv_cache_tokens"
                )
        if sampling.seed is None:
            sampling = _with_seed(sampling, self._rng.getrandbits(63))
        req = Request(req_id, list(prompt_ids), sampling, policy=self.resolve_policy(policy), max_k=max_k)
        self.requests[req_id] = req
        self.waiting.append(req)
        return req

    def resolve_policy(self, spec: str | SpeculationPolicy | None) -> SpeculationPolicy | None:
        """A per-request policy name -> one shared instance per name (so every 'goodput' request
        shares one learned model, the server's own when the names match)."""
        if spec is None or isinstance(spec, SpeculationPolicy):
            return spec
        from goodspec.scheduler.policy import parse_policy, policy_name

        key = policy_name(spec)  # canonical, so the cache holds one entry per distinct policy
        if key == self.policy.name:
            return self.policy
        if key not in self._policies:
            policy = parse_policy(key)
            if hasattr(policy, "seed") and self.profile_records:
                policy.seed(self.profile_records)
            self._policies[key] = policy
        return self._policies[key]

    def goodput_policies(self) -> list[SpeculationPolicy]:
        return [p for p in [self.policy, *self._policies.values()] if hasattr(p, "seed")]

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
            proposal, t_draft = self._propose(plan)
            self._failures["draft"] = 0
        except WorkerLost as e:
            outputs += self._worker_lost("draft", e)
            if self.unhealthy is not None:
                return outputs
            proposal, t_draft = None, 0.0  # verify this step without drafts
            for item in plan.verify:
                item.draft_ids, item.proposal_row = [], -1
        batch = VerifyBatch(plan.verify, proposal)
        t0 = time.perf_counter()
        try:
            result = self.target.verify(batch)
            self._failures["target"] = 0
        except WorkerLost as e:
            return outputs + self._worker_lost("target", e)
        t_verify = time.perf_counter() - t0
        outputs += self._commit(plan, result)
        record = self._record(plan, proposal, result, t_draft, t_verify, time.perf_counter() - t_start)
        self._observe(plan, result, record)
        return outputs

    def _observe(self, plan: _Plan, result: VerifyResult, record: StepRecord) -> None:
        """Feed the policies what happened: (req_id, k, accepted) for each decoding request."""
        by_policy: dict[int, tuple[SpeculationPolicy, list]] = {id(self.policy): (self.policy, [])}
        for item, r, accepted in zip(plan.verify, plan.verify_reqs, result.num_accepted):
            if r.req_id not in plan.ks:
                continue
            outcome = (r.req_id, len(item.draft_ids), accepted)
            by_policy[id(self.policy)][1].append(outcome)
            if r.policy is not None and r.policy is not self.policy:
                by_policy.setdefault(id(r.policy), (r.policy, []))[1].append(outcome)
        for policy, outcomes in by_policy.values():
            policy.observe(outcomes, record)

    def _schedule(self) -> _Plan:
        cfg = self.config
        self._admit()
        # Decode requests first (oldest first), then prefill chunks in the remaining token budget.
        decode = [r for r in self.running if r.in_decode]
        prefill = [r for r in self.running if not r.in_decode]
        caps = [self._k_cap(r) for r in decode]
        room = max(0, cfg.max_num_batched_tokens - len(decode))
        prefill_tokens = min(room, sum(r.num_pending for r in prefill))
        ks = self._choose_k(decode, caps, (len(prefill) if prefill_tokens else 0, prefill_tokens))
        budget = cfg.max_num_batched_tokens - sum(1 + k for k in ks)
        chunks: dict[str, int] = {}
        for r in prefill:
            if budget <= 0:
                break
            n = min(r.num_pending, budget)
            chunks[r.req_id] = n
            budget -= n
        ks_by_id = {r.req_id: k for r, k in zip(decode, ks)}
        ks_by_id = self._fit_kv(ks_by_id, chunks)

        plan = _Plan(ks=ks_by_id)
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
            # Room for the prompt and its first token in both caches, keeping one block of growth
            # per running request, so admitting it does not force a preemption right away.
            need = len(req.token_ids) + 1
            reserve = len(self.running)
            if self._free_blocks(self.target_kv, "target_len") - reserve < self.target_kv.blocks(need):
                break
            if self.draft_kv is not None and self._uses_draft(req) and \
                    self._free_blocks(self.draft_kv, "draft_len") - reserve < self.draft_kv.blocks(need):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)

    def _uses_draft(self, req: Request) -> bool:
        policy = req.policy or self.policy
        return not isinstance(policy, OffPolicy) and req.max_k != 0

    def _free_blocks(self, kv: KVBudget, attr: str) -> int:
        return kv.num_blocks - sum(kv.blocks(getattr(r, attr)) for r in self.running)

    def _k_cap(self, r: Request) -> int:
        if self.draft is None:
            return 0
        cap = self.config.max_k if r.max_k is None else min(r.max_k, self.config.max_k)
        remaining = r.sampling.max_new_tokens - r.num_output
        # A step emits up to k + 1 tokens; the target may not run past its context.
        return max(0, min(cap, remaining - 1, self.config.max_context - len(r.token_ids)))

    def _choose_k(self, decode: Sequence[Request], caps: Sequence[int],
                  prefill: tuple[int, int]) -> list[int]:
        ks = [0] * len(decode)
        groups: dict[int, tuple[SpeculationPolicy, list[int]]] = {}
        for i, r in enumerate(decode):
            policy = r.policy or self.policy
            groups.setdefault(id(policy), (policy, []))[1].append(i)
        for policy, idx in groups.values():
            chosen = policy.choose([decode[i] for i in idx], [caps[i] for i in idx], prefill)
            for i, k in zip(idx, chosen):
                ks[i] = max(0, min(int(k), caps[i]))
        return ks

    def _fit_kv(self, ks: dict[str, int], chunks: dict[str, int]) -> dict[str, int]:
        """Shrink the step until it fits both KV budgets: first drop speculation, then preempt
        the newest running requests (they are recomputed later with the same output)."""
        while True:
            if self._kv_fits(ks, chunks):
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

    def _kv_fits(self, ks: dict[str, int], chunks: dict[str, int]) -> bool:
        t_used = d_used = 0
        for r in self.running:
            t_len, d_len = r.target_len, r.draft_len
            if r.req_id in ks:
                k = ks[r.req_id]
                t_len = len(r.token_ids) + k
                if k > 0:
                    d_len = len(r.token_ids) + k - 1
            elif r.req_id in chunks:
                t_len += chunks[r.req_id]
            t_used += self.target_kv.blocks(t_len)
            if self.draft_kv is not None:
                d_used += self.draft_kv.blocks(d_len)
        if t_used > self.target_kv.num_blocks:
            return False
        return self.draft_kv is None or d_used <= self.draft_kv.num_blocks

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._free_workers([req.req_id])
        req.reset_caches()
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def _propose(self, plan: _Plan) -> tuple[Proposal | None, float]:
        items = []
        for row_item, r in zip(plan.verify, plan.verify_reqs):
            k = plan.ks.get(r.req_id, 0)
            if k == 0:
                continue
            row_item.proposal_row = len(items)
            start = 0 if self.draft_stateless else r.draft_len
            items.append(ProposeItem(r.req_id, start, r.token_ids[start:], k, r.sampling))
            if not self.draft_stateless:
                plan.draft_catchup += len(r.token_ids) - start - 1
        if not items:
            return None, 0.0
        t0 = time.perf_counter()
        proposal = self.draft.propose(ProposeBatch(items))
        elapsed = time.perf_counter() - t0
        for row_item, r in zip(plan.verify, plan.verify_reqs):
            if row_item.proposal_row >= 0:
                row_item.draft_ids = proposal.draft_ids[row_item.proposal_row]
                if not self.draft_stateless:
                    r.draft_len = len(r.token_ids) + len(row_item.draft_ids) - 1
        return proposal, elapsed

    def _commit(self, plan: _Plan, result: VerifyResult) -> list[RequestOutput]:
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
            if r.first_token_time is None:
                r.first_token_time = now
            emitted, reason = self._append_until_finished(r, new_ids)
            r.draft_len = min(r.draft_len, len(r.token_ids) - 1)
            if reason is not None:
                self._finish(r, reason)
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

    def _finish(self, r: Request, reason: FinishReason, free: bool = True) -> None:
        if r.status == RequestStatus.RUNNING:
            self.running.remove(r)
            if free:
                self._free_workers([r.req_id])
        elif r.status == RequestStatus.WAITING:
            self.waiting.remove(r)
        r.status = RequestStatus.FINISHED
        r.finish_reason = reason
        for policy in {id(p): p for p in (self.policy, r.policy) if p is not None}.values():
            policy.forget(r.req_id)
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

    def _record(self, plan: _Plan, proposal, result: VerifyResult, t_draft, t_verify, t_step) -> StepRecord:
        items = plan.verify
        ks = [len(it.draft_ids) for it in items if it.sample]
        record = StepRecord(
            batch_size=len(items),
            num_decode=sum(1 for r in plan.verify_reqs if r.req_id in plan.ks),
            num_draft_reqs=sum(1 for k in ks if k > 0),
            draft_tokens=sum(ks),
            draft_catchup_tokens=plan.draft_catchup,
            verify_tokens=sum(len(it.token_ids) + len(it.draft_ids) for it in items),
            context_tokens=sum(it.start_pos + len(it.token_ids) for it in items),
            max_context=max(it.start_pos + len(it.token_ids) + len(it.draft_ids) for it in items),
            max_k=max(ks, default=0),
            num_accepted=sum(result.num_accepted),
            draft_time=t_draft,
            verify_time=t_verify,
            draft_compute_time=proposal.elapsed_s if proposal is not None else 0.0,
            verify_compute_time=result.elapsed_s,
            step_time=t_step,
            ks=ks,
        )
        self.step_records.append(record)
        if len(self.step_records) > 20_000:
            del self.step_records[:10_000]
        return record


def _with_seed(sampling: SamplingParams, seed: int) -> SamplingParams:
    from dataclasses import replace

    return replace(sampling, seed=seed)
