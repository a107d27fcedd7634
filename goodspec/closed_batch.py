"""Closed-batch throughput of each speculation policy on one in-process engine, any device.

    python -m goodspec.closed_batch --model tiny --device cuda --dtype bfloat16

Every policy runs the same held-out ShareGPT prompts, all admitted at once (no arrivals, no Ray:
what is left is the engine itself), `--replays` times, the policies in turn (a machine that drifts
weighs on each alike); the table gives the median wall time, the ratio to `off`, the mean step,
the median over replays of the draft's and the target's call time per step and of the time per
step spent after it (the policies learning from it), the policies' share of step time spent
choosing k, the mean chosen k, acceptance, and how many greedy outputs equal `off`'s. The GPU
figures in BENCHMARKS.md were measured this way; `goodspec bench` is the latency-against-load
study on the Ray runtime. `--workload chat --max-num-batched-tokens 512 --proposer auto` replays
that study's saturated end instead: its chat requests and the server's token budget, so prompt
chunks share steps with decodes as they do there; `--workload mixed` its mixed workload (chat,
copy-from-the-prompt and sampled requests, each sampled one seeded by its index).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from dataclasses import asdict, dataclass

from goodspec.workers.huge_pages import ask_for_huge_pages

# before torch is imported (the imports below do), so in-process runners get them as workers do
ask_for_huge_pages()

from goodspec.config import MODEL_PAIRS, STARTUP_PROFILE_CHOICES, EngineConfig, startup_profile_for
from goodspec.engine import LLMEngine
from goodspec.scheduler.config import SchedulerConfig
from goodspec.scheduler.policy import PolicySpec
from goodspec.sharegpt import first_turn_prompts
from goodspec.workers.cpu_linear import add_cpu_linear_flag
from goodspec.workers.sampling import SamplingParams


@dataclass(frozen=True)
class PolicyRun:
    policy: str
    walls: list[float]  # seconds, one per replay
    draft_ms: list[float]  # the draft's calls per step, mean over each replay's steps
    verify_ms: list[float]  # the target's calls per step, likewise
    # Per step, likewise: wall time outside the StepRecord's step_time (the policies learning from
    # the step, output handling). Step records are taken before the policies observe the step.
    after_step_ms: list[float]
    tokens: int
    steps: int  # of the last replay, as are the fields below
    mean_step_ms: float
    step_ms_p50_p90_max: list[float]
    choose_share: float  # of step time: the policies choosing k (and cutting drafts)
    mean_k: float
    acceptance: float | None  # accepted / proposed draft tokens
    same_as_off: int  # greedy outputs equal to the first policy's
    requests: int  # greedy ones (a sampled request's output depends on its k: same distribution)
    records: list[dict]  # the last replay's StepRecords

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)


@dataclass(frozen=True)
class Replay:
    wall: float
    outputs: list[list[int]]
    records: list  # StepRecords


def replay(engine: LLMEngine, prompts: list[str], params: list[SamplingParams], policy: str) -> Replay:
    sched = engine.scheduler
    sched.step_records.clear()
    ids = [engine.add_request(p, sp, policy=policy) for p, sp in zip(prompts, params)]
    engine.target.runner.synchronize()
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    wall = time.perf_counter() - t0
    return Replay(wall, [engine.take_completion(i).token_ids for i in ids], list(sched.step_records))


def summary(policy: str, replays: list[Replay], reference: list[list[int]], greedy: list[bool]) -> PolicyRun:
    """One policy's replays; the step figures are the last replay's; `greedy`: which requests'
    outputs must equal the reference's."""
    recs, outputs = replays[-1].records, replays[-1].outputs
    step_times = [r.step_time for r in recs]
    drafted = sum(r.draft_tokens + r.lookup_tokens for r in recs)
    ks = [k for r in recs for k in r.ks]
    deciles = statistics.quantiles(step_times, n=10) if len(step_times) > 1 else step_times * 9
    return PolicyRun(
        policy=policy, walls=[r.wall for r in replays],
        draft_ms=[round(1e3 * statistics.mean(s.draft_time for s in r.records), 3) for r in replays],
        verify_ms=[round(1e3 * statistics.mean(s.verify_time for s in r.records), 3) for r in replays],
        after_step_ms=[round(1e3 * (r.wall - sum(s.step_time for s in r.records)) / len(r.records), 3)
                       for r in replays],
        tokens=sum(len(o) for o in outputs), steps=len(recs),
        mean_step_ms=1e3 * statistics.mean(step_times),
        step_ms_p50_p90_max=[round(1e3 * deciles[4], 2), round(1e3 * deciles[8], 2), round(1e3 * max(step_times), 2)],
        choose_share=sum(r.choose_time for r in recs) / sum(step_times),
        mean_k=statistics.mean(ks) if ks else 0.0,
        acceptance=sum(r.num_accepted for r in recs) / drafted if drafted else None,
        same_as_off=sum(a == b for a, b, g in zip(outputs, reference, greedy) if g), requests=sum(greedy),
        records=[r.to_dict() for r in recs],
    )


def table(runs: list[PolicyRun]) -> str:
    base = runs[0].wall
    lines = [f"{'policy':<16} {'wall s':>7} {'tok/s':>7} {'vs ' + runs[0].policy:>8} {'step ms':>8} "
             f"{'p90 ms':>7} {'draft':>6} {'verify':>6} {'after':>6} {'choose':>7} {'mean k':>7} {'accept':>7} same"]
    for r in runs:
        acc = f"{r.acceptance:7.3f}" if r.acceptance is not None else f"{'-':>7}"
        lines.append(f"{r.policy:<16} {r.wall:7.3f} {r.tokens / r.wall:7.0f} {base / r.wall:7.2f}x "
                     f"{r.mean_step_ms:8.2f} {r.step_ms_p50_p90_max[1]:7.2f} {statistics.median(r.draft_ms):6.2f} "
                     f"{statistics.median(r.verify_ms):6.2f} {statistics.median(r.after_step_ms):6.2f} "
                     f"{r.choose_share:7.2%} "
                     f"{r.mean_k:7.2f} {acc} {r.same_as_off}/{r.requests}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", choices=MODEL_PAIRS)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--draft-dtype", default="auto", help="the draft's dtype (EngineConfig.draft_dtype)")
    add_cpu_linear_flag(ap)
    ap.add_argument("--policies", default="off,fixed:1,fixed:3,fixed:5,goodput,goodput-uniform",
                    help="comma-separated; the first is the baseline (off)")
    ap.add_argument("--prompts", type=int, default=64, help="held-out ShareGPT prompts of 10-600 characters")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--workload", default=None, choices=("chat", "mixed"),
                    help="chat: `goodspec bench`'s chat workload instead (held-out first turns, through the "
                         "chat template where the target has one, each request's output length its ShareGPT "
                         "reply's, capped at --max-new-tokens): the saturated end of the bench's latency study, "
                         "without arrivals or Ray; mixed: its mixed workload (chat, copy and sampled requests)")
    ap.add_argument("--proposer", default="draft", choices=("draft", "auto"))
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048,
                    help="tokens per target forward (the server's default is 512)")
    ap.add_argument("--replays", type=int, default=5)
    ap.add_argument("--startup-profile", default="auto", choices=STARTUP_PROFILE_CHOICES,
                    help="the start-up profiling sweep: auto (on where a policy learns step times; cached on disk) "
                         "| on | off (goodput learns from this run's steps only; the sweep over a 65536-token KV "
                         "budget took ~100 s on SmolLM2 on a 2-core AVX2 CPU)")
    ap.add_argument("--out", default=None, help="write the runs as JSON here, each with its last replay's step records")
    args = ap.parse_args(argv)

    engine = LLMEngine(EngineConfig(
        model=args.model, policy="off", device=args.device, dtype=args.dtype, draft_dtype=args.draft_dtype,
        proposer=args.proposer,
        cpu_linear=args.cpu_linear, target_kv_tokens=65536, draft_kv_tokens=65536,
        startup_profile=startup_profile_for((PolicySpec.parse(p) for p in args.policies.split(",") if p.strip()),
                                            args.startup_profile),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_k=8,
                                  max_num_batched_tokens=args.max_num_batched_tokens)))
    if args.workload:
        from goodspec.workloads import build_workload

        items = build_workload(args.workload, engine.codec, args.prompts, seed=0,
                               max_output_tokens=args.max_new_tokens, chat=engine.codec.has_chat_template)
        prompts = [it.prompt for it in items]
        params = [SamplingParams(max_new_tokens=it.max_new_tokens, ignore_eos=True, temperature=it.temperature,
                                 seed=i if it.temperature > 0 else None) for i, it in enumerate(items)]
    else:
        fitting = (p for p, _ in first_turn_prompts(held_out=True) if 10 <= len(p) <= 600)
        prompts = list(itertools.islice(fitting, args.prompts))  # stop reading once there are enough
        params = [SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)] * len(prompts)
    if len(prompts) < args.prompts:
        raise SystemExit(f"only {len(prompts)} held-out prompts fit; asked for {args.prompts}")
    runner = engine.target.runner
    print(f"{args.model} on {runner.device} ({runner.dtype}, {runner.onednn_linears} oneDNN linears): "
          f"{len(prompts)} {args.workload or 'plain'} prompts, "
          f"{sum(p.max_new_tokens for p in params)} tokens in all, max_num_seqs {args.max_num_seqs}, "
          f"{args.max_num_batched_tokens} tokens a step, proposer {args.proposer}, median of {args.replays} replays",
          flush=True)
    replay(engine, prompts, params, "fixed:3")  # warm-up: kernels, allocator
    policies = args.policies.split(",")
    done: dict[str, list[Replay]] = {p: [] for p in policies}
    for _ in range(args.replays):  # round robin: a machine that drifts weighs on every policy alike
        for policy in policies:
            done[policy].append(replay(engine, prompts, params, policy))
    reference = done[policies[0]][-1].outputs
    greedy = [p.temperature == 0 for p in params]
    runs = [summary(p, done[p], reference, greedy) for p in policies]
    print(table(runs))
    if args.out:
        with open(args.out, "w") as f:
            json.dump([asdict(r) for r in runs], f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
