"""EngineStats: one engine's counters, the one record that GetServerStats, /metrics,
`goodspec generate --stats` and the tests read (built from the scheduler by its owning thread)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

RECENT_STEPS = 2000  # speculation counters cover this many recent steps
OVERHEAD_STEPS = 512  # the overhead share covers this many


@dataclass(frozen=True)
class EngineStats:
    replica: int = 0
    policy: str = ""  # the server's speculation policy
    running: int = 0
    waiting: int = 0
    num_steps: int = 0  # every step since the engine started (not only the recent ones kept)
    target_blocks_used: int = 0  # the scheduler's view of the workers' KV caches
    draft_blocks_used: int = 0
    worker_failures: int = 0  # failed worker calls since the engine started
    unhealthy: str | None = None  # why the engine serves no more; None while it can
    overhead_share: float = 0.0  # of recent step time, what was spent outside the models
    choose_share: float = 0.0  # of recent step time, what choosing k took (the policies' cost)
    k_histogram: dict[int, int] = field(default_factory=dict)  # recent steps: k -> request-steps
    # every step since the engine started: k -> request-steps. The difference of two readings is
    # a run's own histogram; k_histogram's is not, once older steps leave its window.
    k_totals: dict[int, int] = field(default_factory=dict)
    mean_k: float = 0.0
    draft_tokens_proposed: int = 0
    draft_tokens_accepted: int = 0
    acceptance_rate: float | None = None
    step_time_mape: float | None = None  # goodput's step-time prediction error, recent steps
    predicted_vs_measured_s: list[tuple[float, float]] = field(default_factory=list)

    @classmethod
    def of(cls, scheduler, replica: int = 0, loop_error: str | None = None) -> "EngineStats":
        """Read the scheduler; call it on the thread that owns it."""
        records = scheduler.step_records[-RECENT_STEPS:]
        k_hist = Counter(k for r in records for k in r.ks)
        proposed = sum(r.draft_tokens for r in records)
        accepted = sum(r.num_accepted for r in records)
        recent = records[-OVERHEAD_STEPS:]
        step = sum(r.step_time for r in recent)
        compute = sum(r.draft_compute_time + r.verify_compute_time for r in recent)
        log = [pair for p in scheduler.policies.learning() for pair in getattr(p, "prediction_log", [])]
        errs = [abs(pred - real) / real for pred, real in log[-500:] if real > 0]
        target_used, draft_used = scheduler.kv.used(scheduler.running)
        return cls(
            replica=replica, policy=scheduler.policy.name,
            running=len(scheduler.running), waiting=len(scheduler.waiting),
            num_steps=scheduler.num_steps,
            target_blocks_used=target_used, draft_blocks_used=draft_used,
            worker_failures=scheduler.num_worker_failures,
            unhealthy=scheduler.unhealthy or loop_error,
            overhead_share=(1 - compute / step) if step > 0 else 0.0,
            choose_share=sum(r.choose_time for r in recent) / step if step > 0 else 0.0,
            k_histogram=dict(sorted(k_hist.items())),
            k_totals=dict(sorted(scheduler.k_totals.items())),
            mean_k=(sum(k * n for k, n in k_hist.items()) / sum(k_hist.values())) if k_hist else 0.0,
            draft_tokens_proposed=proposed, draft_tokens_accepted=accepted,
            acceptance_rate=accepted / proposed if proposed else None,
            step_time_mape=sum(errs) / len(errs) if errs else None,
            predicted_vs_measured_s=[tuple(x) for x in log[-20:]],
        )

    @classmethod
    def silent(cls, replica: int, why: str) -> "EngineStats":
        """An engine that does not answer: zero counters and the reason."""
        return cls(replica=replica, unhealthy=why)

    def to_json(self) -> dict:
        return asdict(self)
