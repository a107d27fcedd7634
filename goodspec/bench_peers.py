"""What a user would pick instead of goodspec, on the same model pair and prompts (offline: every
request submitted at t = 0, the same max_new_tokens for all, greedy):
- Hugging Face assisted generation (`generate(..., assistant_model=draft)`), one request at a
  time since it cannot batch: request i finishes after the i first ones;
- transformers' own continuous batching (`generate_batch`), no speculation."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import torch

from goodspec.bench import TraceItem, run_trace
from goodspec.gguf_import import model_path
from goodspec.workers.model_runner import VOCAB_MAP_FILE


def _row(requests: int, wall: float, tokens: int, latencies: list[float]) -> dict:
    return {"requests": requests, "wall_s": wall, "tokens_per_s": tokens / wall,
            "mean_latency_s": statistics.mean(latencies)}


def goodspec_offline(address: str, prompts: list[str], max_new_tokens: int, policy: str = "goodput",
                     token: str | None = None) -> dict:
    trace = [TraceItem(p, max_new_tokens, 0.0) for p in prompts]
    t0 = time.perf_counter()
    recs = asyncio.run(run_trace(address, trace, policy, 0.0, token=token))
    wall = time.perf_counter() - t0
    errors = [r.error for r in recs if r.error]
    if errors:
        raise RuntimeError(f"goodspec offline run had errors: {errors[:3]}")
    return _row(len(recs), wall, sum(r.output_tokens for r in recs), [r.latency_s for r in recs])


def hf_assisted(target_dir: str, draft_dir: str, prompts: list[str], max_new_tokens: int, codec) -> dict | None:
    """None for a draft with a reduced vocabulary: HF assisted generation needs the target's."""
    if (Path(draft_dir) / VOCAB_MAP_FILE).is_file():
        return None
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(model_path(target_dir), dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()
    pad = codec.tokenizer.pad_token_id
    done, latencies, tokens = 0.0, [], 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([codec.encode(p)])
            start = time.perf_counter()
            out = target.generate(ids, assistant_model=draft, max_new_tokens=max_new_tokens,
                                  min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            done += time.perf_counter() - start
            latencies.append(done)  # submitted at t = 0, served one after another
            tokens += out.shape[1] - ids.shape[1]
    return _row(len(prompts), time.perf_counter() - t0, tokens, latencies)


def hf_continuous_batching(target_dir: str, prompts: list[str], max_new_tokens: int, codec) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(model_path(target_dir), dtype=torch.float32).eval()
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                           eos_token_id=codec.eos_token_id, pad_token_id=codec.tokenizer.pad_token_id)
    inputs = [codec.encode(p) for p in prompts]
    t0 = time.perf_counter()
    outs = model.generate_batch(inputs=inputs, generation_config=cfg, progress_bar=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.generated_tokens) for o in outs.values())
    latencies = [o.lifespan[1] - t0 if o.lifespan[1] > 0 else wall for o in outs.values()]
    return _row(len(prompts), wall, tokens, latencies)
