"""A draft's acceptance in goodspec's own engine: every held-out ShareGPT first turn through the
chat template, greedy, under `off` and fixed k, in process; accepted / proposed draft tokens per
policy and whether each policy's outputs equal `off`'s.

    python -m goodspec.training.engine_acceptance --prompts 319 --new-tokens 128 --policies off,fixed:1,fixed:3

The held-out evaluation of goodspec.training.distill_feature_draft scores the draft at every
position of the target's replies; this counts what the engine's verifications accepted, the
figure speculation is paid by (at fixed:1 the position after a bonus token is never proposed)."""

from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm import tqdm

from goodspec.config import EngineConfig
from goodspec.engine import LLMEngine
from goodspec.scheduler.config import SchedulerConfig
from goodspec.sharegpt import first_turn_prompts
from goodspec.training.teacher_data import cut_user_text
from goodspec.workers.sampling import SamplingParams


def held_out_chat(engine: LLMEngine, limit: int, user_tokens: int) -> list[str]:
    """Held-out first turns cut as the draft's evaluation cuts them, rendered as text: the engine
    takes prompts as text and encodes them itself."""
    tok = engine.codec.tokenizer
    return [engine.codec.render_chat([("user", cut_user_text(tok, user, user_tokens))])
            for user, _ in first_turn_prompts(held_out=True, limit=limit)]


def run(engine: LLMEngine, prompts: list[str], policy: str, new_tokens: int) -> tuple[list[list[int]], dict]:
    t0 = time.time()
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=new_tokens), policy=policy) for p in prompts]
    with tqdm(total=len(ids), desc=policy, unit="req") as bar:
        while engine.has_unfinished():
            bar.update(sum(out.finished for out in engine.step()))
    got = [engine.take_completion(i) for i in ids]
    accepted = sum(c.usage.draft_tokens_accepted for c in got)
    proposed = sum(c.usage.draft_tokens_proposed for c in got)
    return [c.token_ids for c in got], {
        "accepted": accepted, "proposed": proposed, "rate": round(accepted / max(proposed, 1), 4),
        "output_tokens": sum(len(c.token_ids) for c in got), "seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--draft", default="", metavar="DIR",
                    help="a draft directory to score against --model's target (default: the pair's own draft)")
    ap.add_argument("--prompts", type=int, default=319, help="held-out first turns (the split has 319)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--user-tokens", type=int, default=192)
    ap.add_argument("--policies", default="off,fixed:1,fixed:3", help="comma-separated; `off` first to compare outputs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draft-dtype", default="auto", help="the draft's dtype (EngineConfig.draft_dtype), e.g. int8")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = LLMEngine(EngineConfig(
        model=args.model, draft_dir=args.draft, policy="off", device="cpu", dtype="float32",
        draft_dtype=args.draft_dtype, target_kv_tokens=65536,
        draft_kv_tokens=65536, scheduler=SchedulerConfig(max_num_seqs=32, max_k=8, max_num_batched_tokens=1024)))
    prompts = held_out_chat(engine, args.prompts, args.user_tokens)
    outputs, report = {}, {}
    for policy in args.policies.split(","):
        outputs[policy], report[policy] = run(engine, prompts, policy, args.new_tokens)
        if "off" in outputs and policy != "off":
            report[policy]["outputs_equal_off"] = sum(a == b for a, b in zip(outputs[policy], outputs["off"]))
    print(json.dumps({"prompts": len(prompts), "new_tokens": args.new_tokens,
                      "draft_weights": engine.draft.runner.weights, **report}, indent=2))


if __name__ == "__main__":
    main()
