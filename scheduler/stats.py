"""Counters about speculation that operators read: chosen k, acceptance, prediction error."""

from __future__ import annotations

from collections import Counter


def speculation_stats(scheduler, last: int = 2000) -> dict:
    records = scheduler.step_records[-last:]
    k_hist = Counter(k for r in records for k in r.ks)
    proposed = sum(r.draft_tokens for r in records)
    accepted = sum(r.num_accepted for r in records)
    out = {
        "policy": scheduler.policy.name,
        "k_histogram": dict(sorted(k_hist.items())),
        "mean_k": (sum(k * n for k, n in k_hist.items()) / sum(k_hist.values())) if k_hist else 0.0,
        "draft_tokens_proposed": proposed,
        "draft_tokens_accepted": accepted,
        "acceptance_rate": accepted / proposed if proposed else None,
    }
    log = [pair for p in scheduler.goodput_policies() for pair in getattr(p, "prediction_log", [])]
    if log:
        errs = [abs(pred - real) / real for pred, real in log[-500:] if real > 0]
        out["step_time_mape"] = sum(errs) / len(errs) if errs else None
        out["predicted_vs_measured_s"] = [list(x) for x in log[-20:]]
    return out
