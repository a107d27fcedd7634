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


def time_forward(
    runner: ModelRunner, batch_size: int, tokens_per_seq: int, context: int, repeats: int = 15
) -> ForwardTiming:
    """Median wall time of one forward appending tokens_per_seq tokens to each of batch_size
    sequences that already hold `context` tokens (rolled back after each repeat)."""
    ids = [f"profile-{i}" for i in range(batch_size)]
    prompt = [(7 * i) % 1000 + 3 for i in range(context)]
    runner.forward(ids, [0] * batch_size, [prompt] * batch_size, [1] * batch_size)
    new = [[11 + j for j in range(tokens_per_seq)]] * batch_size
    samples = []
    try:
        for r in range(repeats + 2):  # two warm-up runs
            t0 = time.perf_counter()
            runner.forward(ids, [context] * batch_size, new, [tokens_per_seq] * batch_size)
            runner.synchronize()
            if r >= 2:
                samples.append(time.perf_counter() - t0)
    finally:
        runner.free(ids)
    return ForwardTiming(batch_size, tokens_per_seq, context, statistics.median(samples), len(samples))
