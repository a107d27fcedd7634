"""How much of an engine's step time is spent outside the two models' forwards: actor and channel
calls, serialisation, scheduling. Measured on the real runtime (Ray actors, the worker channels),
through the EngineGroup's own API."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from goodspec.cluster.group import EngineGroup
from goodspec.scheduler.policy import PolicySpec
from goodspec.workers.sampling import SamplingParams


@dataclass
class OverheadReport:
    policy: str
    batch_size: int
    steps: int  # full-batch decode steps measured
    share: float  # 1 - (draft + verify compute) / step time, summed over those steps
    step_ms: float  # medians over those steps
    draft_call_ms: float
    draft_compute_ms: float
    verify_call_ms: float
    verify_compute_ms: float
    choose_share: float = 0.0  # of step time: the policy choosing k (part of `share`)

    def line(self) -> str:
        return (f"{self.policy:10s} batch {self.batch_size}: outside the models {self.share:6.1%} of "
                f"{self.steps} steps | median step {self.step_ms:6.2f} ms = draft call "
                f"{self.draft_call_ms:5.2f} (compute {self.draft_compute_ms:5.2f}) + verify call "
                f"{self.verify_call_ms:5.2f} (compute {self.verify_compute_ms:5.2f}) + scheduling "
                f"(choosing k: {self.choose_share:.2%} of step time)")


def measure_overhead(group: EngineGroup, prompts: list[str], policy: str,
                     max_new_tokens: int, temperature: float = 0.0) -> OverheadReport:
    """Run the prompts together under `policy` and report over the steps where all of them were
    decoding (prefill steps measure something else). `temperature` > 0: sampled requests, whose
    draft tokens travel with the draft's distributions."""
    start = group.stats()[0].num_steps
    group.complete_all(prompts, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True,
                                               temperature=temperature, seed=0 if temperature else None),
                       policy=PolicySpec.parse(policy))
    ran = group.stats()[0].num_steps - start  # the run's own steps: the newest `ran` records
    records = group.step_records(0, last=ran) if ran > 0 else []
    n = len(prompts)
    rs = [r for r in records if r["batch_size"] == n and r["num_decode"] == n]
    if not rs:
        raise RuntimeError("no full-batch decode step was recorded; raise max_new_tokens")
    step = sum(r["step_time"] for r in rs)
    compute = sum(r["draft_compute_time"] + r["verify_compute_time"] for r in rs)

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rs) * 1e3

    return OverheadReport(policy, n, len(rs), 1 - compute / step, med("step_time"), med("draft_time"),
                          med("draft_compute_time"), med("verify_time"), med("verify_compute_time"),
                          sum(r["choose_time"] for r in rs) / step)
