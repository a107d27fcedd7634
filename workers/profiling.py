"""Measure a model runner's forward cost for a batch shape: the raw material for deciding when
speculation pays (and later for seeding the goodput model's step-time fit)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from goodspec.workers.model_runner import ModelRunner


@dataclass(frozen=True)
class ForwardTiming:
    batch_size: int
    tokens_per_seq: int
    context: int
    median_s: float
    samples: int


def compare_forwards(
    runner: ModelRunner, batch_size: int, tokens_a: int, tokens_b: int, context: int, repeats: int = 15
) -> tuple[ForwardTiming, ForwardTiming]:
    """Median times of two forward shapes measured alternately (a, b, a, b, ...), so a machine
    that speeds up or slows down during the run moves both alike and their ratio stays fair."""
    ids = [f"profile-{i}" for i in range(batch_size)]
    prompt = [(7 * i) % 1000 + 3 for i in range(context)]
    runner.forward(ids, [0] * batch_size, [prompt] * batch_size, [1] * batch_size)
    samples: dict[int, list[float]] = {tokens_a: [], tokens_b: []}
    try:
        for r in range(repeats + 2):  # two warm-up rounds
            for q in (tokens_a, tokens_b):
                new = [[11 + j for j in range(q)]] * batch_size
                t0 = time.perf_counter()
                runner.forward(ids, [context] * batch_size, new, [q] * batch_size)
                runner.synchronize()
                if r >= 2:
                    samples[q].append(time.perf_counter() - t0)
    finally:
        runner.free(ids)
    return tuple(ForwardTiming(batch_size, q, context, statistics.median(samples[q]), repeats)
                 for q in (tokens_a, tokens_b))
