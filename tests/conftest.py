"""Shared fixtures: the shipped model pair and held-out ShareGPT prompts."""

from __future__ import annotations

import os

import pytest
import torch

from goodspec.config import DEFAULT_DRAFT, DEFAULT_TARGET, EngineConfig
from goodspec.scheduler.scheduler import SchedulerConfig

# Two cores: keep torch from oversubscribing when workers share the process.
torch.set_num_threads(int(os.environ.get("GOODSPEC_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def sharegpt_prompts() -> list[str]:
    """40 held-out first-turn ShareGPT prompts of at most 600 characters."""
    from goodspec.sharegpt import first_turn_prompts

    out = []
    for prompt, _ in first_turn_prompts(held_out=True):
        if 10 <= len(prompt) <= 600:
            out.append(prompt)
        if len(out) == 40:
            break
    return out


def engine_config(policy: str = "off", **overrides) -> EngineConfig:
    sched = overrides.pop("scheduler", SchedulerConfig(max_num_seqs=16, max_k=8,
                                                       max_num_batched_tokens=512))
    base = dict(target_dir=DEFAULT_TARGET, draft_dir=DEFAULT_DRAFT, policy=policy, device="cpu",
                dtype="float32", target_kv_tokens=16384, draft_kv_tokens=16384, scheduler=sched)
    base.update(overrides)
    return EngineConfig(**base)


@pytest.fixture(scope="session")
def shared_engine():
    """One in-process engine for tests that only need to generate (policy is set per request)."""
    from goodspec.engine import LLMEngine

    return LLMEngine(engine_config("off"))
