"""Train goodspec's shipped draft/target pair from ShareGPT on the CPU.

    python -m goodspec.training.train_pair --out goodspec/models

Steps (seeded, so a rerun on the same machine gives the same weights):
  1. a byte-level BPE tokenizer on training conversations (held-out ones never seen);
  2. the target, a 6-layer Llama, trained from scratch (warm-up + cosine learning rate);
  3. the draft, a 1-layer Llama, distilled from the target (KL to the target's distribution),
     first on ShareGPT text, then on the target's own greedy continuations of training prompts
     ("on-policy": the text the draft must predict when it speculates);
  4. an evaluation on held-out ShareGPT: target perplexity and the draft's greedy per-token
     acceptance against the target, written to `<out>/report.json`.
Weights are stored in float16 to keep the pair small; the engine loads them in float32 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from goodspec.sharegpt import exchanges, iter_conversations

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    vocab_size: int = 4096
    tokenizer_chars: int = 40_000_000
    seq_len: int = 256
    batch_size: int = 16
    target_steps: int = 700
    target_lr: float = 3e-3
    warmup_steps: int = 40
    draft_steps: int = 500
    draft_lr: float = 4e-3
    onpolicy_prompts: int = 3072  # training prompts the target continues for on-policy distillation
    onpolicy_prompt_tokens: int = 128  # each prompt's first tokens
    onpolicy_new_tokens: int = 128  # greedy target tokens generated after each
    onpolicy_steps: int = 3000
    onpolicy_lr: float = 2e-3
    eval_docs: int = 64
    eval_prompts: int = 64
    eval_new_tokens: int = 32
    threads: int = 2


def target_config(vocab_size: int, bos: int, eos: int, pad: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
    )


def draft_config(vocab_size: int, bos: int, eos: int, pad: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
    )


def documents(held_out: bool) -> Iterator[tuple[str, str]]:
    """Every (prompt, reply) exchange; a conversation is wholly train or wholly held out."""
    for conv in iter_conversations():
        if conv.is_held_out() == held_out:
            yield from exchanges(conv)


def train_tokenizer(cfg: TrainConfig, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    def texts() -> Iterator[str]:
        budget = cfg.tokenizer_chars
        for prompt, reply in documents(held_out=False):
            yield prompt + "\n\n" + reply
            budget -= len(prompt) + len(reply)
            if budget <= 0:
                return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, special_tokens=[BOS, EOS, PAD], show_progress=True,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Every encoded prompt starts with BOS, as in training.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=1024, clean_up_tokenization_spaces=False,
    )
    hf.save_pretrained(out_dir / "target")
    hf.save_pretrained(out_dir / "draft")
    return hf


def token_stream(tokenizer, held_out: bool, seed: int) -> Iterator[int]:
    """Endless stream of `BOS prompt \\n\\n reply EOS` documents, shuffled in blocks."""
    rng = random.Random(seed)
    eos = tokenizer.eos_token_id
    while True:
        block: list[tuple[str, str]] = []
        for doc in documents(held_out):
            block.append(doc)
            if len(block) == 512:
                rng.shuffle(block)
                yield from _encode_block(tokenizer, block, eos)
                block = []
        if block:
            yield from _encode_block(tokenizer, block, eos)
        if held_out:
            return


def _encode_block(tokenizer, block, eos) -> Iterator[int]:
    enc = tokenizer([p + "\n\n" + r for p, r in block], add_special_tokens=True)["input_ids"]
    for ids in enc:
        yield from ids
        yield eos


def batches(stream: Iterator[int], batch_size: int, seq_len: int) -> Iterator[torch.Tensor]:
    n = batch_size * (seq_len + 1)
    while True:
        buf = [next(stream) for _ in range(n)]
        yield torch.tensor(buf, dtype=torch.long).view(batch_size, seq_len + 1)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def optimise(model: torch.nn.Module, loss_at_step, steps: int, peak_lr: float, warmup: int,
             weight_decay: float, desc: str, metric: str) -> torch.nn.Module:
    """AdamW with warm-up + cosine learning rate and gradient clipping; `loss_at_step()` returns
    the next batch's loss. Leaves the model in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    model.train()
    bar = tqdm(range(steps), desc=desc, unit="step")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, peak_lr, warmup)
        loss = loss_at_step()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix({metric: f"{loss.item():.3f}"})
    model.eval()
    return model


def train_target(cfg: TrainConfig, tokenizer) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(target_config(len(tokenizer), tokenizer.bos_token_id,
                                           tokenizer.eos_token_id, tokenizer.pad_token_id))
    data = batches(token_stream(tokenizer, False, cfg.seed), cfg.batch_size, cfg.seq_len)

    def loss_at_step() -> torch.Tensor:
        x = next(data)
        logits = model(input_ids=x[:, :-1]).logits
        return F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())

    return optimise(model, loss_at_step, cfg.target_steps, cfg.target_lr, cfg.warmup_steps, 0.1,
                    "target", "loss")


def distill_draft(cfg: TrainConfig, tokenizer, target: torch.nn.Module) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.seed + 1)
    draft = LlamaForCausalLM(draft_config(len(tokenizer), tokenizer.bos_token_id,
                                          tokenizer.eos_token_id, tokenizer.pad_token_id))
    data = batches(token_stream(tokenizer, False, cfg.seed + 1), cfg.batch_size, cfg.seq_len)

    def loss_at_step() -> torch.Tensor:
        x = next(data)[:, :-1]
        with torch.no_grad():
            teacher = F.log_softmax(target(input_ids=x).logits, dim=-1)
        student = F.log_softmax(draft(input_ids=x).logits, dim=-1)
        # KL(target || draft): the draft learns to put mass where the target does, which is
        # what raises the acceptance probability min(1, p/q).
        return F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True,
                        reduction="batchmean")

    return optimise(draft, loss_at_step, cfg.draft_steps, cfg.draft_lr, cfg.warmup_steps, 0.0,
                    "draft", "kl")


@torch.no_grad()
def onpolicy_data(cfg: TrainConfig, tokenizer, target) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The target's greedy continuations of training prompts, with its log-probabilities at every
    generated position (from generate's own logits: no second target pass).
    Returns ids [n, P + N] (prompts left-padded to P), attention mask [n, P + N], and the target's
    log-probs [n, N, vocab] in float16 for positions P..P+N-1."""
    from goodspec.sharegpt import first_turn_prompts

    P, N, bs = cfg.onpolicy_prompt_tokens, cfg.onpolicy_new_tokens, 32
    prompts = [p for p, _ in first_turn_prompts(held_out=False, limit=cfg.onpolicy_prompts)]
    tokenizer.padding_side = "left"
    ids_out, mask_out, logp_out = [], [], []
    for i in tqdm(range(0, len(prompts), bs), desc="on-policy data", unit="batch"):
        enc = tokenizer(prompts[i:i + bs], return_tensors="pt", padding="max_length", truncation=True,
                        max_length=P)
        out = target.generate(**enc, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                              output_logits=True, return_dict_in_generate=True,
                              pad_token_id=tokenizer.pad_token_id)
        ids_out.append(out.sequences)
        mask_out.append(torch.cat([enc["attention_mask"], torch.ones(len(out.sequences), N, dtype=torch.long)], 1))
        logp_out.append(F.log_softmax(torch.stack(out.logits, 1).float(), -1).half())
    return torch.cat(ids_out), torch.cat(mask_out), torch.cat(logp_out)


def distill_draft_on_policy(cfg: TrainConfig, tokenizer, target, draft) -> torch.nn.Module:
    """Continue distilling the draft on the target's own outputs: KL(target || draft) only at the
    generated positions, where acceptance is decided."""
    ids, mask, teacher = onpolicy_data(cfg, tokenizer, target)
    P = cfg.onpolicy_prompt_tokens
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as the engine numbers a left-unpadded prompt
    gen = torch.Generator().manual_seed(cfg.seed + 2)

    def loss_at_step() -> torch.Tensor:
        rows = torch.randint(0, len(ids), (cfg.batch_size,), generator=gen)
        logits = draft(input_ids=ids[rows, :-1], attention_mask=mask[rows, :-1],
                       position_ids=positions[rows, :-1]).logits[:, P - 1:]  # predicts P..P+N-1
        student = F.log_softmax(logits, dim=-1)
        return F.kl_div(student.flatten(0, 1), teacher[rows].float().flatten(0, 1), log_target=True,
                        reduction="batchmean")

    return optimise(draft, loss_at_step, cfg.onpolicy_steps, cfg.onpolicy_lr, cfg.warmup_steps, 0.0,
                    "draft on-policy", "kl")


@torch.no_grad()
def evaluate(cfg: TrainConfig, tokenizer, target, draft) -> dict:
    """Held-out perplexity of both models and the draft's greedy acceptance against the target."""
    stream = token_stream(tokenizer, True, cfg.seed)
    nll = {"target": 0.0, "draft": 0.0}
    count = 0
    for _ in tqdm(range(cfg.eval_docs // cfg.batch_size), desc="eval ppl"):
        x = next(batches(stream, cfg.batch_size, cfg.seq_len))
        for name, model in (("target", target), ("draft", draft)):
            logits = model(input_ids=x[:, :-1]).logits
            nll[name] += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(),
                                         reduction="sum").item()
        count += x[:, 1:].numel()

    # Acceptance: on the target's own greedy continuation of held-out prompts, how often the
    # draft's argmax equals the target's (the probability a greedy draft token is accepted).
    from goodspec.sharegpt import first_turn_prompts

    agree = total = 0
    prompts = [p for p, _ in first_turn_prompts(held_out=True, limit=cfg.eval_prompts)]
    for prompt in tqdm(prompts, desc="eval acceptance"):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"][:, -256:]
        out = target.generate(ids, max_new_tokens=cfg.eval_new_tokens, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)
        n_prompt = ids.shape[1]
        t_pred = target(input_ids=out).logits[0, n_prompt - 1:-1].argmax(-1)
        d_pred = draft(input_ids=out).logits[0, n_prompt - 1:-1].argmax(-1)
        agree += (t_pred == d_pred).sum().item()
        total += t_pred.numel()
    return {
        "target_heldout_ppl": math.exp(nll["target"] / count),
        "draft_heldout_ppl": math.exp(nll["draft"] / count),
        "heldout_tokens": count,
        "greedy_acceptance": agree / total,
        "acceptance_positions": total,
        "target_params": sum(p.numel() for p in target.parameters()),
        "draft_params": sum(p.numel() for p in draft.parameters()),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "models")
    ap.add_argument("--target-steps", type=int, default=TrainConfig.target_steps)
    ap.add_argument("--draft-steps", type=int, default=TrainConfig.draft_steps)
    ap.add_argument("--onpolicy-steps", type=int, default=TrainConfig.onpolicy_steps)
    ap.add_argument("--seed", type=int, default=TrainConfig.seed)
    ap.add_argument("--draft-on-policy-only", action="store_true",
                    help="keep the tokenizer, target and draft in --out; only run the draft's "
                         "on-policy distillation (step 3's second half) and re-evaluate")
    args = ap.parse_args(argv)
    cfg = TrainConfig(seed=args.seed, target_steps=args.target_steps, draft_steps=args.draft_steps,
                      onpolicy_steps=args.onpolicy_steps)
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    out: Path = args.out
    t0 = time.time()
    previous = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
    if args.draft_on_policy_only:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(out / "target")
        target = AutoModelForCausalLM.from_pretrained(out / "target", dtype=torch.float32).eval()
        draft = AutoModelForCausalLM.from_pretrained(out / "draft", dtype=torch.float32)
    else:
        tokenizer = train_tokenizer(cfg, out)
        target = train_target(cfg, tokenizer)
        target.to(torch.float16).save_pretrained(out / "target")
        target.float()
        draft = distill_draft(cfg, tokenizer, target)
    draft = distill_draft_on_policy(cfg, tokenizer, target, draft)
    draft.to(torch.float16).save_pretrained(out / "draft")
    draft.float()
    report = evaluate(cfg, tokenizer, target, draft)
    report["train_config"] = asdict(cfg)
    report["wall_seconds"] = round(time.time() - t0, 1)
    if args.draft_on_policy_only:
        report["wall_seconds"] += previous.get("wall_seconds", 0.0)
        report["before_on_policy"] = {k: previous[k] for k in ("greedy_acceptance", "draft_heldout_ppl")
                                      if k in previous}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
