"""`goodspec bench`: latency against request rate on a workload (goodspec.workloads: ShareGPT
chat, copy-heavy, sampled, mixed, or a JSONL file), several speculation policies on one
identical trace, driven over gRPC like any client would (vLLM's serving benchmark, SmartSpec's
figures). Writes raw records (JSON), a Markdown table and a latency-vs-rate plot (PNG)."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from goodspec.client import AsyncGenerationClient, GenerationClient
from goodspec.workloads import WorkloadItem, build_workload


@dataclass(frozen=True)
class TraceItem:
    prompt: str
    max_new_tokens: int
    arrival_s: float  # offset from the start of the run
    temperature: float = 0.0
    kind: str = "chat"  # which part of the workload (mixed: chat, copy, sampled)


@dataclass
class RequestRecord:
    policy: str
    rate: float
    index: int
    kind: str = "chat"
    prompt_tokens: int = 0
    output_tokens: int = 0
    arrival_s: float = 0.0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    draft_tokens_proposed: int = 0
    draft_tokens_accepted: int = 0
    mean_k: float = 0.0
    lookup_tokens_proposed: int = 0  # of draft_tokens_proposed: prompt lookup's (proposer auto)
    error: str | None = None
    repeat: int = 0


@dataclass
class RunSummary:
    policy: str
    rate: float
    num_requests: int
    errors: int
    mean_latency_s: float
    p50_latency_s: float
    p90_latency_s: float
    p99_latency_s: float
    mean_ttft_s: float
    mean_tpot_s: float
    requests_per_s: float
    tokens_per_s: float
    accepted_draft_tokens_per_s: float
    acceptance_rate: float | None
    lookup_share: float | None = None  # of the draft tokens verified, those prompt lookup proposed
    k_histogram: dict = field(default_factory=dict)
    repeat_mean_latencies_s: list = field(default_factory=list)  # one per repeat of the trace
    kind_mean_latencies_s: dict = field(default_factory=dict)  # per part of a mixed workload
    # a goodput policy's: the server's step-time MAPE after each of its replays, median (its
    # last 500 pure-decode steps, each predicted before it ran); None for a static policy
    step_time_mape: float | None = None


# -- trace ------------------------------------------------------------------------------------
def poisson_trace(workload: list[WorkloadItem], rate: float, seed: int) -> list[TraceItem]:
    rng = random.Random(seed)
    t = 0.0
    out = []
    for item in workload:
        out.append(TraceItem(item.prompt, item.max_new_tokens, t, item.temperature, item.kind))
        t += rng.expovariate(rate)
    return out


# -- driving ----------------------------------------------------------------------------------
async def run_trace(address: str, trace: list[TraceItem], policy: str, rate: float, bar=None,
                    token: str | None = None) -> list[RequestRecord]:
    async with AsyncGenerationClient(address, token=token) as client:
        t0 = time.perf_counter()

        async def one(i: int, item: TraceItem) -> RequestRecord:
            rec = RequestRecord(policy=policy, rate=rate, index=i, kind=item.kind, arrival_s=item.arrival_s)
            await asyncio.sleep(max(0.0, item.arrival_s - (time.perf_counter() - t0)))
            start = time.perf_counter()
            # A sampled request has the same seed under every policy: lossless speculation then
            # gives it the same tokens, so every policy does the same work.
            sampling = dict(temperature=item.temperature, seed=i) if item.temperature > 0 else {}
            try:
                async for msg in client.generate(item.prompt, max_new_tokens=item.max_new_tokens,
                                                 ignore_eos=True, policy=policy, **sampling):
                    if msg.token_ids and rec.ttft_s == 0.0:
                        rec.ttft_s = time.perf_counter() - start
                    rec.output_tokens += len(msg.token_ids)
                    if msg.HasField("usage"):
                        u = msg.usage
                        rec.prompt_tokens = u.prompt_tokens
                        rec.draft_tokens_proposed = u.draft_tokens_proposed
                        rec.draft_tokens_accepted = u.draft_tokens_accepted
                        rec.mean_k = u.mean_k
                        rec.lookup_tokens_proposed = u.lookup_tokens_proposed
            except Exception as e:  # noqa: BLE001 - counted and reported, never hidden
                rec.error = f"{type(e).__name__}: {e}"
            rec.latency_s = time.perf_counter() - start
            if bar is not None:
                bar.update(1)
            return rec

        return list(await asyncio.gather(*(one(i, it) for i, it in enumerate(trace))))


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarise(records: list[RequestRecord], k_hist: dict) -> RunSummary:
    """Latencies pooled over every repeat; rates (req/s, tok/s) per trace replay."""
    ok = [r for r in records if r.error is None]
    lat = [r.latency_s for r in ok]
    repeats = sorted({r.repeat for r in records})
    per_repeat = [statistics.mean(r.latency_s for r in ok if r.repeat == i)
                  for i in repeats if any(r.repeat == i for r in ok)]
    span = sum(max((r.arrival_s + r.latency_s for r in ok if r.repeat == i), default=0.0)
               for i in repeats) or 1e-9
    tpot = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    proposed = sum(r.draft_tokens_proposed for r in ok)
    accepted = sum(r.draft_tokens_accepted for r in ok)
    return RunSummary(
        policy=records[0].policy, rate=records[0].rate, num_requests=len(records),
        errors=len(records) - len(ok),
        mean_latency_s=statistics.mean(lat) if lat else float("nan"),
        p50_latency_s=_pct(lat, 0.5), p90_latency_s=_pct(lat, 0.9), p99_latency_s=_pct(lat, 0.99),
        mean_ttft_s=statistics.mean(r.ttft_s for r in ok) if ok else float("nan"),
        mean_tpot_s=statistics.mean(tpot) if tpot else float("nan"),
        requests_per_s=len(ok) / span, tokens_per_s=sum(r.output_tokens for r in ok) / span,
        accepted_draft_tokens_per_s=accepted / span,
        acceptance_rate=accepted / proposed if proposed else None, k_histogram=k_hist,
        lookup_share=sum(r.lookup_tokens_proposed for r in ok) / proposed if proposed else None,
        repeat_mean_latencies_s=per_repeat,
        kind_mean_latencies_s={k: statistics.mean(r.latency_s for r in ok if r.kind == k)
                               for k in sorted({r.kind for r in ok})},
    )


def is_adaptive(policy: str) -> bool:
    """A goodput policy (goodput, goodput-uniform, goodput-conf): compared with the static ones,
    and reported with its step-time error."""
    return policy.startswith("goodput")


def _server_counters(address: str, token: str | None) -> tuple[dict[int, int], float | None]:
    """The k histogram over every step since the start (k_histogram's window forgets) and the
    step-time MAPE, of every engine (the MAPE: their mean, None before any prediction)."""
    with GenerationClient(address, token=token) as c:
        out: dict[int, int] = {}
        engines = c.server_stats().engines
        for e in engines:
            for k, n in e.k_totals.items():
                out[k] = out.get(k, 0) + n
        mapes = [e.step_time_mape for e in engines if e.step_time_mape > 0]
        return out, (statistics.mean(mapes) if mapes else None)


def run_benchmark(address: str, rates: list[float], policies: list[str], num_requests: int,
                  seed: int, warmup: int, codec, max_output_tokens: int, progress: bool = True,
                  token: str | None = None, repeats: int = 1, chat: bool = False,
                  workload_name: str = "chat") -> tuple[list[RequestRecord], list[RunSummary]]:
    """Every policy replays the identical trace at each rate, `repeats` times, the policies'
    order rotating between repeats so slow drifts of a shared machine hit every policy alike."""
    workload = build_workload(workload_name, codec, num_requests, seed, max_output_tokens=max_output_tokens,
                              chat=chat)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(rates) * len(policies) * len(workload) * repeats, desc="bench", unit="req")
    if warmup:
        # Warm every policy's path (the goodput model starts fitting on live steps here).
        for policy in policies:
            asyncio.run(run_trace(address, poisson_trace(workload[:warmup], 100.0, seed), policy, 0.0,
                                  token=token))
    records: list[RequestRecord] = []
    summaries: list[RunSummary] = []
    for rate in rates:
        trace = poisson_trace(workload, rate, seed)  # identical for every policy at this rate
        recs: dict[str, list[RequestRecord]] = {p: [] for p in policies}
        hists: dict[str, dict[int, int]] = {p: {} for p in policies}
        mapes: dict[str, list[float]] = {p: [] for p in policies}
        for rep in range(repeats):
            shift = rep % len(policies)
            for policy in policies[shift:] + policies[:shift]:
                before, _ = _server_counters(address, token)
                run = asyncio.run(run_trace(address, trace, policy, rate, bar, token))
                after, mape = _server_counters(address, token)
                if mape is not None and is_adaptive(policy):
                    mapes[policy].append(mape)
                for r in run:
                    r.repeat = rep
                recs[policy] += run
                for k in after:
                    if after[k] - before.get(k, 0) > 0:
                        hists[policy][k] = hists[policy].get(k, 0) + after[k] - before.get(k, 0)
        for policy in policies:
            records += recs[policy]
            summary = summarise(recs[policy], dict(sorted(hists[policy].items())))
            summary.step_time_mape = statistics.median(mapes[policy]) if mapes[policy] else None
            summaries.append(summary)
    if bar is not None:
        bar.close()
    return records, summaries


# -- reporting --------------------------------------------------------------------------------
def ratios(summaries: list[RunSummary]) -> list[dict]:
    """Per rate: each goodput policy's mean latency over the best static policy's (off,
    fixed:K or lookup:K) and over off's."""
    out = []
    for rate in sorted({s.rate for s in summaries}):
        at = {s.policy: s for s in summaries if s.rate == rate}
        adaptive = [p for p in at if is_adaptive(p)]
        if not adaptive:
            continue
        static = {p: s for p, s in at.items() if p == "off" or p.startswith(("fixed:", "lookup:"))}
        best = min(static.values(), key=lambda s: s.mean_latency_s) if static else None
        row: dict = {"rate": rate, "adaptive": adaptive}
        if best is not None:
            row["best_static"] = best.policy
        for p in adaptive:
            key = p.replace("-", "_")
            row[f"{key}_step_time_mape"] = at[p].step_time_mape
            if best is not None:
                row[f"{key}_over_best_static"] = at[p].mean_latency_s / best.mean_latency_s
            if "off" in at:
                row[f"{key}_over_off"] = at[p].mean_latency_s / at["off"].mean_latency_s
        out.append(row)
    return out


def markdown_table(summaries: list[RunSummary]) -> str:
    head = ("| rate (req/s) | policy | mean lat (s) (repeats' range) | p50 | p90 | p99 | TTFT (s) | TPOT (ms) | req/s | "
            "tok/s | accepted draft tok/s | acceptance | lookup share | k histogram | errors |")
    lines = [head, "|" + "---|" * 15]
    for s in summaries:
        acc = f"{s.acceptance_rate:.2f}" if s.acceptance_rate is not None else "-"
        share = f"{s.lookup_share:.2f}" if s.lookup_share is not None else "-"
        hist = " ".join(f"{k}:{n}" for k, n in s.k_histogram.items()) or "-"
        mean = f"{s.mean_latency_s:.2f}"
        if len(s.repeat_mean_latencies_s) > 1:  # the spread between replays of the same trace
            mean += f" ({min(s.repeat_mean_latencies_s):.2f}-{max(s.repeat_mean_latencies_s):.2f})"
        lines.append(
            f"| {s.rate:g} | {s.policy} | {mean} | {s.p50_latency_s:.2f} | "
            f"{s.p90_latency_s:.2f} | {s.p99_latency_s:.2f} | {s.mean_ttft_s:.3f} | "
            f"{s.mean_tpot_s * 1e3:.1f} | {s.requests_per_s:.2f} | {s.tokens_per_s:.1f} | "
            f"{s.accepted_draft_tokens_per_s:.1f} | {acc} | {share} | {hist} | {s.errors} |")
    return "\n".join(lines) + "\n"


def ratio_lines(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        parts = [f"rate {r['rate']:g} req/s:"]
        for name in r["adaptive"]:
            key = name.replace("-", "_")
            if f"{key}_over_best_static" in r:
                parts.append(f"{name} / best static ({r['best_static']}) = {r[f'{key}_over_best_static']:.3f}")
            if f"{key}_over_off" in r:
                parts.append(f"{name} / off = {r[f'{key}_over_off']:.3f}")
            if r.get(f"{key}_step_time_mape") is not None:
                parts.append(f"{name} step-time MAPE = {r[f'{key}_step_time_mape']:.1%}")
        out.append("  ".join(parts))
    return out


def plot(summaries: list[RunSummary], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy in dict.fromkeys(s.policy for s in summaries):
        pts = sorted((s.rate, s.mean_latency_s) for s in summaries if s.policy == policy)
        style = dict(linewidth=2.5, color="black") if policy == "goodput" else dict(linewidth=1.2)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy, **style)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("mean request latency (s)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(out_dir: Path, records, summaries, meta: dict, peers: dict | None = None) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = ratios(summaries)
    data = {"meta": meta, "summaries": [asdict(s) for s in summaries], "ratios": rows,
            "records": [asdict(r) for r in records], **({"peers": peers} if peers else {})}
    (out_dir / "results.json").write_text(json.dumps(data, indent=1))
    md = [f"# goodspec bench\n\n`{meta.get('command', '')}`\n", markdown_table(summaries), ""]
    md += [f"- {line}" for line in ratio_lines(rows)]
    if any(len(s.kind_mean_latencies_s) > 1 for s in summaries):
        md += ["", "Mean latency (s) by part of the workload:", ""]
        md += [f"- rate {s.rate:g}, {s.policy}: " + ", ".join(f"{k} {v:.2f}" for k, v in s.kind_mean_latencies_s.items())
               for s in summaries]
    if peers:
        md += ["", "## Peers (same prompts, offline)", "", peers_table(peers)]
    (out_dir / "results.md").write_text("\n".join(md) + "\n")
    plot(summaries, out_dir / "latency.png", meta.get("title", "goodspec: mean latency vs request rate"))
    return data


def peers_table(peers: dict) -> str:
    lines = ["| system | requests | wall (s) | tok/s | mean latency (s) | tok/s vs goodspec | latency vs goodspec |",
             "|---|---|---|---|---|---|---|"]
    base = peers["goodspec"]
    for name, p in peers.items():
        lines.append(f"| {name} | {p['requests']} | {p['wall_s']:.1f} | {p['tokens_per_s']:.1f} | "
                     f"{p['mean_latency_s']:.2f} | {p['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
                     f"{p['mean_latency_s'] / base['mean_latency_s']:.2f}x |")
    return "\n".join(lines) + "\n"
