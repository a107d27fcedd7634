"""Shared fixtures: the shipped model pair and held-out ShareGPT prompts."""

from __future__ import annotations

import os

import pytest
import torch

from goodspec.config import DEFAULT_DRAFT, DEFAULT_TARGET, EngineConfig
from goodspec.scheduler.config import SchedulerConfig

# Two cores: keep torch from oversubscribing when workers share the process.
torch.set_num_threads(int(os.environ.get("GOODSPEC_TEST_THREADS", "2")))


# The GPU path runs too wherever CUDA is present (a lent GPU machine); CI has only the CPU.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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


def reference_length(i: int) -> int:
    """Output lengths 12..30 by prompt index: requests leave a batch at different steps."""
    return 12 + (i % 4) * 6


@pytest.fixture(scope="session")
def greedy_reference(sharegpt_prompts) -> dict[str, tuple[int, list[int]]]:
    """prompt -> (max_new_tokens, target-only greedy ids) from plain transformers `generate`,
    one prompt at a time: an implementation independent of goodspec's."""
    from transformers import AutoModelForCausalLM

    from goodspec.workers.tokenizer import TextCodec

    codec = TextCodec.load(DEFAULT_TARGET)
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_TARGET, dtype=torch.float32).eval()
    out = {}
    for i, prompt in enumerate(sharegpt_prompts[:32]):
        ids = codec.encode(prompt)
        n = reference_length(i)
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                 pad_token_id=codec.tokenizer.pad_token_id)
        out[prompt] = (n, gen[0, len(ids):].tolist())
    return out


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session, always shut down."""
    import ray

    from goodspec.cluster.ray_runtime import start_local_ray

    start_local_ray(num_cpus=12)
    yield
    ray.shutdown()


# Runs first: on a machine whose cache has no conversion of the SmolLM2 GGUF file yet (a fresh
# one, CI), it converts into the real cache, and every real-pair test after it reads that
# conversion instead of making its own first (which made the file convert twice, ~30 s each).
CONVERSION_TEST = "test_real_pair.py::test_gguf_converts_once_into_a_plain_model_with_identical_logits"


def pytest_collection_modifyitems(config, items):
    """The GGUF conversion test first (above). Tests on the shared Ray session run last: until
    the first of them, no Ray is running, so the in-process timing tests (the step-time model's
    accuracy) do not measure an idle Ray cluster's background load on 2 cores. The sort is
    stable: order within each group is kept."""
    items.sort(key=lambda item: (not item.nodeid.endswith(CONVERSION_TEST),
                                 "ray_session" in getattr(item, "fixturenames", ())))
