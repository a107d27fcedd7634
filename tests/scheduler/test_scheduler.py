"""The scheduler's step loop, driven by hand-built worker answers (no models, no Ray).

The fake workers below compute a fixed greedy rule instead of a network, so each edge case
(all accepted, first rejected, EOS inside the bonus token, preemption, cache exhaustion, abort)
is reachable on purpose; they also hold per-request caches and check the scheduler's start_pos
protocol on every call, like the real workers do.
"""

from __future__ import annotations

import pytest

from goodspec.scheduler.policy import FixedPolicy, OffPolicy
from goodspec.scheduler.request import FinishReason
from goodspec.scheduler.config import KVBudget, SchedulerConfig
from goodspec.scheduler.errors import EngineUnhealthy, RequestRejected, WorkerGone, WorkerLost
from goodspec.scheduler.scheduler import Scheduler
from goodspec.workers.messages import Proposal, VerifyResult
from goodspec.workers.sampling import SamplingParams

EOS = 1


def rule(context: list[int]) -> int:
    """The 'target model': a deterministic next token that never collides with EOS by chance."""
    return 2 + (context[-1] * 7 + len(context)) % 40


class FakeWorker:
    def __init__(self, wrong_every: int = 0) -> None:
        self.cache: dict[str, list[int]] = {}
        self.calls = 0
        self.freed: list[str] = []
        self.wrong_every = wrong_every  # the draft errs at positions divisible by this

    def _append(self, req_id: str, start: int, tokens: list[int]) -> list[int]:
        have = self.cache.get(req_id, [])
        assert start <= len(have), f"{req_id}: start {start} beyond cached {len(have)}"
        self.cache[req_id] = have[:start] + list(tokens)
        return self.cache[req_id]

    def free(self, req_ids):
        for r in req_ids:
            self.cache.pop(r, None)
            self.freed.append(r)


class FakeDraft(FakeWorker):
    def propose(self, batch):
        self.calls += 1
        ids = []
        for it in batch.items:
            ctx = self._append(it.req_id, it.start_pos, it.token_ids)
            out = []
            for _ in range(it.num_draft):
                tok = rule(ctx + out)
                if self.wrong_every and (len(ctx) + len(out)) % self.wrong_every == 0:
                    tok = 2 + (tok + 1) % 40
                out.append(tok)
            self.cache[it.req_id] = ctx + out[:-1]  # the last draft token is never fed
            ids.append(out)
        return Proposal(draft_ids=ids, draft_probs=None)


class FakeTarget(FakeWorker):
    def __init__(self, eos_at: dict[str, int] | None = None) -> None:
        super().__init__()
        self.eos_at = eos_at or {}  # req_id -> sequence length at which the target says EOS

    def next_token(self, req_id, ctx):
        return EOS if self.eos_at.get(req_id) == len(ctx) else rule(ctx)

    def verify(self, batch):
        self.calls += 1
        accepted, outputs = [], []
        for it in batch.items:
            ctx = self._append(it.req_id, it.start_pos, it.token_ids)
            if not it.sample:
                accepted.append(0)
                outputs.append([])
                continue
            a = 0
            for d in it.draft_ids:
                if self.next_token(it.req_id, ctx + it.draft_ids[:a]) != d:
                    break
                a += 1
            out = it.draft_ids[:a] + [self.next_token(it.req_id, ctx + it.draft_ids[:a])]
            self.cache[it.req_id] = ctx + it.draft_ids[:a]
            accepted.append(a)
            outputs.append(out)
        return VerifyResult(accepted, outputs)


def expected(prompt, n, eos_at=None):
    ctx = list(prompt)
    while len(ctx) - len(prompt) < n:
        tok = EOS if eos_at == len(ctx) else rule(ctx)
        ctx.append(tok)
        if tok == EOS:
            break
    return ctx[len(prompt):]


def make(policy, draft=None, target=None, blocks=64, block_size=4, **cfg):
    target = target or FakeTarget()
    draft = draft if draft is not None else FakeDraft()
    config = SchedulerConfig(max_num_seqs=cfg.pop("max_num_seqs", 8), max_k=cfg.pop("max_k", 4),
                             max_num_batched_tokens=cfg.pop("max_num_batched_tokens", 64),
                             max_context=cfg.pop("max_context", 256), eos_token_id=EOS)
    budget = KVBudget(blocks, block_size)
    return Scheduler(config, target, budget, draft, budget, policy=policy), target, draft


def run(s: Scheduler):
    steps = 0
    while s.has_unfinished():
        s.step()
        steps += 1
        assert steps < 10_000
    return steps


PROMPTS = {f"r{i}": [3 + i, 5, 7 + i] * (1 + i % 3) for i in range(6)}


def test_all_accepted_emits_k_plus_one_tokens_per_step():
    s, target, draft = make(FixedPolicy(3))
    s.add_request("a", [3, 4, 5], SamplingParams(max_new_tokens=17))
    steps = run(s)
    req = s.pop_finished("a")
    assert req.output_ids == expected([3, 4, 5], 17)
    assert req.num_draft_accepted == req.num_draft_proposed  # the fake draft is never wrong
    assert steps == 1 + 4  # prefill emits 1, then 4 steps of k+1 = 4 tokens (k capped at the end)
    assert target.cache == {} and draft.cache == {}


def test_first_draft_token_always_rejected_still_gives_target_output():
    s, _, _ = make(FixedPolicy(4), draft=FakeDraft(wrong_every=1))
    for rid, p in PROMPTS.items():
        s.add_request(rid, p, SamplingParams(max_new_tokens=9))
    run(s)
    for rid, p in PROMPTS.items():
        req = s.pop_finished(rid)
        assert req.output_ids == expected(p, 9)
        assert req.num_draft_accepted == 0 and req.num_draft_proposed > 0


def test_partial_acceptance_rolls_caches_back_and_output_is_unchanged():
    s, target, draft = make(FixedPolicy(4), draft=FakeDraft(wrong_every=3))
    for rid, p in PROMPTS.items():
        s.add_request(rid, p, SamplingParams(max_new_tokens=30))
    run(s)
    for rid, p in PROMPTS.items():
        req = s.pop_finished(rid)
        assert req.output_ids == expected(p, 30)
        assert 0 < req.num_draft_accepted < req.num_draft_proposed


def test_eos_inside_the_bonus_token_finishes_and_drops_nothing_extra():
    # EOS is the bonus token of a fully accepted verify: sequence length 3 + 1 + 4 = 8.
    s, target, draft = make(FixedPolicy(3), target=FakeTarget(eos_at={"a": 8}))
    s.add_request("a", [3, 4, 5], SamplingParams(max_new_tokens=50))
    run(s)
    req = s.pop_finished("a")
    assert req.finish_reason == FinishReason.EOS
    assert req.output_ids == expected([3, 4, 5], 50, eos_at=8) and req.output_ids[-1] == EOS
    assert target.cache == {} and draft.cache == {}


def test_eos_inside_accepted_drafts_cuts_the_rest():
    s, target, _ = make(FixedPolicy(4), target=FakeTarget(eos_at={"a": 6}))
    s.add_request("a", [3, 4, 5], SamplingParams(max_new_tokens=50))
    run(s)
    assert s.pop_finished("a").output_ids == expected([3, 4, 5], 50, eos_at=6)


def test_k_zero_makes_no_draft_call():
    s, target, draft = make(OffPolicy())
    s.add_request("a", [3, 4, 5], SamplingParams(max_new_tokens=5))
    run(s)
    assert draft.calls == 0 and target.calls == 5


def test_small_budget_preempts_newest_and_outputs_are_unchanged():
    # 12 blocks of 4 tokens for six requests of up to ~30 tokens each.
    s, target, draft = make(FixedPolicy(2), blocks=12, draft=FakeDraft(wrong_every=3))
    for rid, p in PROMPTS.items():
        s.add_request(rid, p, SamplingParams(max_new_tokens=20))
    run(s)
    preempted = 0
    for rid, p in PROMPTS.items():
        req = s.pop_finished(rid)
        assert req.output_ids == expected(p, 20)
        preempted += req.num_preemptions
    assert preempted > 0
    assert target.cache == {} and draft.cache == {}


def test_request_that_can_never_fit_is_rejected_with_the_budget_in_the_message():
    s, _, _ = make(FixedPolicy(2), blocks=8)
    with pytest.raises(RequestRejected, match="whole budget is 32 tokens"):
        s.add_request("big", [3] * 10, SamplingParams(max_new_tokens=40))
    with pytest.raises(RequestRejected, match="prompt is empty"):
        s.add_request("empty", [], SamplingParams())
    with pytest.raises(RequestRejected, match="context is 256"):
        s.add_request("long", [3] * 300, SamplingParams())
    assert not s.has_unfinished()


def test_abort_frees_both_caches_at_once_and_others_finish():
    s, target, draft = make(FixedPolicy(2))
    s.add_request("a", [3, 4, 5], SamplingParams(max_new_tokens=30))
    s.add_request("b", [6, 7], SamplingParams(max_new_tokens=10))
    s.step()
    s.step()
    assert "a" in target.cache
    assert s.abort("a")
    assert "a" not in target.cache and "a" not in draft.cache
    outs = s.step()
    assert any(o.req_id == "a" and o.finish_reason == FinishReason.CANCELLED for o in outs)
    run(s)
    assert s.pop_finished("b").output_ids == expected([6, 7], 10)
    assert not s.abort("a")


def test_long_prompt_is_prefilled_in_chunks_while_others_decode():
    s, target, _ = make(FixedPolicy(1), max_num_batched_tokens=16, max_num_seqs=2, max_k=1, blocks=64)
    s.add_request("short", [3, 4], SamplingParams(max_new_tokens=12))
    s.step()
    s.add_request("long", list(range(2, 42)), SamplingParams(max_new_tokens=4))
    for _ in range(3):
        outs = {o.req_id: o for o in s.step()}
        assert outs["short"].new_token_ids  # the running request is never stalled
    run(s)
    assert s.pop_finished("long").output_ids == expected(list(range(2, 42)), 4)


def test_stop_string_cuts_output():
    s, _, _ = make(FixedPolicy(3))
    s.stop_checker = lambda out, stop, n: next((i + 1 for i, t in enumerate(out) if str(t) in stop), None)
    want = expected([3, 4, 5], 30)
    stop_tok = want[6]
    s.add_request("a", [3, 4, 5], SamplingParams(max_new_tokens=30, stop=(str(stop_tok),)))
    run(s)
    req = s.pop_finished("a")
    assert req.finish_reason == FinishReason.STOP
    assert req.output_ids == want[: want.index(stop_tok) + 1]


def test_step_records_what_the_goodput_model_needs():
    s, _, _ = make(FixedPolicy(2))
    s.add_request("a", [3, 4, 5], SamplingParams(max_new_tokens=8))
    s.add_request("b", [3, 4], SamplingParams(max_new_tokens=8))
    run(s)
    spec = [r for r in s.step_records if r.draft_tokens]
    assert spec and all(r.batch_size == 2 and r.num_accepted <= r.draft_tokens for r in spec)
    assert all(r.verify_tokens == r.batch_size + r.draft_tokens for r in spec)
    assert all(r.draft_time >= 0 and r.verify_time > 0 for r in spec)


def test_k_totals_count_every_step_where_the_stats_histogram_keeps_recent_ones(monkeypatch):
    """A client diffs k_totals across a run (goodspec bench's k histogram): they must count
    every request-step since the start, not the window k_histogram covers."""
    from goodspec.scheduler import stats

    monkeypatch.setattr(stats, "RECENT_STEPS", 3)
    s, _, _ = make(FixedPolicy(2))
    s.add_request("a", [3, 4, 5], SamplingParams(max_new_tokens=12))
    s.add_request("b", [3, 4], SamplingParams(max_new_tokens=8))
    run(s)
    every = [k for r in s.step_records for k in r.ks]
    snapshot = stats.EngineStats.of(s)
    assert len(s.step_records) > 3
    assert snapshot.k_totals == {k: every.count(k) for k in sorted(set(every))}
    assert sum(snapshot.k_histogram.values()) < len(every)  # the last 3 steps only
    done = len(s.step_records)
    s.add_request("c", [3, 4, 6], SamplingParams(max_new_tokens=5))
    run(s)
    later = stats.EngineStats.of(s).k_totals
    new = [k for r in s.step_records[done:] for k in r.ks]
    assert new and {k: n - snapshot.k_totals.get(k, 0) for k, n in later.items()} == \
        {k: new.count(k) for k in later}  # two readings' difference: the run between them


def test_num_steps_counts_every_step_after_the_records_are_trimmed(monkeypatch):
    """`goodspec overhead` takes a run's records as the newest (num_steps after - before): the
    count must go on where the scheduler drops its oldest records."""
    from goodspec.scheduler import scheduler as scheduler_module, stats

    monkeypatch.setattr(scheduler_module, "MAX_STEP_RECORDS", 4)
    s, _, _ = make(FixedPolicy(1))
    s.add_request("a", [3, 4, 5], SamplingParams(max_new_tokens=12))
    steps = run(s)  # each of its steps verifies (one request, nothing else to wait for)
    assert steps > 4 and len(s.step_records) <= 4  # trimmed
    assert stats.EngineStats.of(s).num_steps == steps


class CrashingWorker:
    """Wraps a fake worker; its calls number `crash_on` fail as if the process died, and the
    worker comes back empty (a restarted actor)."""

    def __init__(self, inner, method, crash_on, error=WorkerLost):
        self.inner, self.method, self.crash_on, self.n = inner, method, set(crash_on), 0
        self.error = error

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name != self.method:
            return attr

        def call(batch):
            self.n += 1
            if self.n in self.crash_on:
                self.inner.cache.clear()
                raise self.error(f"{self.method}: actor died")
            return attr(batch)

        return call


@pytest.mark.parametrize("which", ["target", "draft"])
def test_worker_that_dies_and_restarts_mid_generation_changes_no_output(which):
    target, draft = FakeTarget(), FakeDraft(wrong_every=3)
    if which == "target":
        target = CrashingWorker(target, "verify", crash_on={4, 9})
    else:
        draft = CrashingWorker(draft, "propose", crash_on={3, 8})
    s, _, _ = make(FixedPolicy(3), draft=draft, target=target)
    for rid, p in PROMPTS.items():
        s.add_request(rid, p, SamplingParams(max_new_tokens=25))
    run(s)
    assert s.num_worker_failures == 2 and s.unhealthy is None
    for rid, p in PROMPTS.items():
        assert s.pop_finished(rid).output_ids == expected(p, 25)


def test_worker_that_keeps_failing_fails_requests_clearly_and_engine_reports_unhealthy():
    target = CrashingWorker(FakeTarget(), "verify", crash_on=set(range(3, 100)))
    s, _, _ = make(FixedPolicy(2), target=target)
    for rid, p in PROMPTS.items():
        s.add_request(rid, p, SamplingParams(max_new_tokens=25))
    run(s)
    assert s.unhealthy and "target worker failed 3 times" in s.unhealthy
    for rid in PROMPTS:
        req = s.pop_finished(rid)
        assert req.finish_reason == FinishReason.ERROR and "target worker failed" in req.error
    with pytest.raises(EngineUnhealthy):
        s.add_request("late", [3, 4], SamplingParams())


def test_worker_gone_for_good_fails_requests_at_its_first_failure():
    """No retries for a worker Ray will not restart: the first failure ends the engine."""
    draft = CrashingWorker(FakeDraft(wrong_every=3), "propose", crash_on={3}, error=WorkerGone)
    s, _, _ = make(FixedPolicy(2), draft=draft)
    for rid, p in PROMPTS.items():
        s.add_request(rid, p, SamplingParams(max_new_tokens=25))
    run(s)
    assert s.num_worker_failures == 1 and "draft worker is gone for good" in s.unhealthy
    for rid in PROMPTS:
        req = s.pop_finished(rid)
        assert req.finish_reason == FinishReason.ERROR and "gone for good" in req.error


def test_per_request_policy_spellings_share_one_cached_policy_and_the_cache_is_bounded():
    """Each distinct policy string used to be parsed and kept forever ('fixed:0...03' by the
    thousand); now a spelling parses to one PolicySpec and the book keeps one policy per spec."""
    from goodspec.scheduler.policy import MAX_FIXED_K, PolicySpec

    s, _, _ = make(OffPolicy(), draft=FakeDraft())
    book = s.policies
    spellings = ["fixed:3", "FIXED:3", " fixed:03 ", "fixed:0003", "Fixed:3"]
    assert {PolicySpec.parse(p) for p in spellings} == {PolicySpec("fixed", 3)}
    assert len({id(book.resolve(PolicySpec.parse(p))) for p in spellings}) == 1
    assert book.resolve(PolicySpec.parse("off")) is s.policy and book.resolve(None) is s.policy
    for k in range(MAX_FIXED_K + 1):
        book.resolve(PolicySpec.parse(f"fixed:{k:04d}"))
    book.resolve(PolicySpec.parse("goodput"))
    assert len(book.all()) == 1 + (MAX_FIXED_K + 1) + 1  # the server's, fixed:0..K, goodput
    for bad in ("fixed:" + "0" * 10 + "1", f"fixed:{MAX_FIXED_K + 1}", "fixed:-1", "sometimes", "x" * 33):
        with pytest.raises(ValueError):
            PolicySpec.parse(bad)


@pytest.mark.parametrize("text", ["off", "fixed:3", "lookup:5", "goodput", "goodput-uniform", "goodput-conf"])
def test_a_spec_builds_the_policy_it_names_and_knows_whether_it_learns_without_building(text):
    from goodspec.scheduler.policy import PolicySpec

    spec = PolicySpec.parse(text)
    policy = spec.build()
    assert policy.name == spec.name == text
    assert spec.learns_step_times == policy.learns_step_times == text.startswith("goodput")
    assert getattr(policy, "uniform", False) == (text == "goodput-uniform")
    assert (getattr(policy, "calibrator", None) is not None) == (text == "goodput-conf")
