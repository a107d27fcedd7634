"""The teacher's side of the draft's distillation: SmolLM2's chat prompts, the target's own
greedy replies to them (on-policy), and its distribution over ShareGPT's replies read
teacher-forced; each with the target's top-k log-probabilities at every reply position, cached
in resumable parts (hours of CPU). Used by goodspec.training.distill_smollm2."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm import tqdm

if TYPE_CHECKING:
    from goodspec.training.distill_smollm2 import DistillConfig

PART_PROMPTS = 512  # prompts per cached file of target replies


def cut_user_text(tokenizer, user_text: str, max_user_tokens: int) -> str:
    """The user's text cut to its first `max_user_tokens` tokens: what every rendered prompt of
    the draft's training and evaluation carries."""
    return tokenizer.decode(tokenizer(user_text, add_special_tokens=False)["input_ids"][:max_user_tokens])


def render(tokenizer, user_text: str, max_user_tokens: int) -> list[int]:
    text = cut_user_text(tokenizer, user_text, max_user_tokens)
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                         add_generation_prompt=True, return_dict=False)


def chat_prompts(tokenizer, held_out: bool, limit: int, max_user_tokens: int,
                 offset: int = 0, later_turns: bool = False) -> list[list[int]]:
    """Rendered first user turns (or, with `later_turns`, the later user turns, each on its own)."""
    from goodspec.sharegpt import first_turn_prompts, later_turn_prompts

    texts = (later_turn_prompts(held_out=held_out, limit=offset + limit) if later_turns
             else (p for p, _ in first_turn_prompts(held_out=held_out, limit=offset + limit)))
    return [render(tokenizer, p, max_user_tokens) for p in itertools.islice(texts, offset, None)]


def chat_exchanges(tokenizer, start: int, limit: int, cfg: DistillConfig) -> list[tuple[list[int], list[int]]]:
    """(rendered prompt, assistant reply ids ending in the end-of-turn token unless cut) for the
    training conversations' first exchanges from index `start` on."""
    from goodspec.sharegpt import first_turn_prompts

    eos = tokenizer.eos_token_id
    out = []
    for user, reply in itertools.islice(first_turn_prompts(held_out=False, limit=start + limit), start, None):
        ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
        ids = ids[:cfg.forced_reply_tokens] if len(ids) >= cfg.forced_reply_tokens else ids + [eos]
        out.append((render(tokenizer, user, cfg.prompt_user_tokens), ids))
    return out


class _TopLogprobs:
    """A logits processor that keeps the top-k log-probabilities of each step and changes
    nothing: with `output_logits` instead, a batch of 64 held 128 vocabulary-wide rows per
    sequence (several GB) until the end of generation."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        lp, ids = F.log_softmax(scores.float(), -1).topk(self.top, -1)
        self.steps.append((lp.half(), ids.to(torch.int32)))
        return scores


class _NormOutputs:
    """Keeps what the target's final norm outputs at every forward of a `generate` call (the
    prefill's [b, prompt width, d], then [b, 1, d] per decode step): the last hidden state a feature
    draft reads, from the forwards generation runs anyway instead of a second pass over the text."""

    def __init__(self, target) -> None:
        self.steps: list[torch.Tensor] = []
        self._handle = target.model.norm.register_forward_hook(lambda _m, _i, out: self.steps.append(out.detach()))

    def close(self) -> None:
        self._handle.remove()

    @functools.cached_property
    def decoded(self) -> torch.Tensor:
        """[b, decode steps, d]: the states at the generated tokens fed back, in order."""
        return torch.cat(self.steps[1:], 1) if len(self.steps) > 1 else self.steps[0][:, :0]

    def row(self, r: int, prompt_len: int, width: int, reply_len: int) -> torch.Tensor:
        """Row r's states at the positions its record's sequence reads (prompt + reply[:-1])."""
        prefill = self.steps[0][r, width - prompt_len:]
        return torch.cat([prefill, self.decoded[r, :reply_len - 1]]).to(torch.bfloat16).clone()


@torch.no_grad()
def target_replies(target, tokenizer, prompts: list[list[int]], new_tokens: int, batch: int,
                   top: int, desc: str) -> list[dict]:
    """Greedy replies, batched by prompt length; per reply the generated ids up to and including
    the end token, and the target's top-`top` ids and log-probs at each generated position."""
    return _replies(target, tokenizer, prompts, new_tokens, batch, top, desc, False)[0]


@torch.no_grad()
def target_replies_and_states(target, tokenizer, prompts: list[list[int]], new_tokens: int, batch: int,
                              top: int, desc: str) -> tuple[list[dict], list[torch.Tensor]]:
    """`target_replies` and, per reply, the target's last hidden state at every position its
    record's sequence reads (bfloat16), as goodspec.training.target_features would compute them
    in a second pass (one generation instead: that pass cost 12 minutes per 7168 replies here)."""
    return _replies(target, tokenizer, prompts, new_tokens, batch, top, desc, True)


def _replies(target, tokenizer, prompts: list[list[int]], new_tokens: int, batch: int, top: int, desc: str,
             keep_states: bool) -> tuple[list[dict], list[torch.Tensor]]:
    from transformers import LogitsProcessorList

    eos = tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[dict | None] = [None] * len(prompts)
    states: list[torch.Tensor | None] = [None] * len(prompts) if keep_states else []
    for s in tqdm(range(0, len(order), batch), desc=desc, unit="batch", leave=False):
        idx = order[s:s + batch]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), eos, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):  # left padding: every reply starts at column `width`
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]):] = 1
        keep = _TopLogprobs(top)
        norm = _NormOutputs(target) if keep_states else None
        try:
            seqs = target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                   do_sample=False, logits_processor=LogitsProcessorList([keep]),
                                   pad_token_id=eos)
        finally:
            if norm is not None:
                norm.close()
        top_lp = torch.stack([lp for lp, _ in keep.steps], 1)  # [b, n, top]
        top_id = torch.stack([i for _, i in keep.steps], 1)
        reply = seqs[:, width:]
        for r, i in enumerate(idx):
            ends = (reply[r] == eos).nonzero()
            n = int(ends[0]) + 1 if len(ends) else reply.shape[1]
            out[i] = {"prompt": prompts[i], "reply": reply[r, :n].tolist(),
                      "top_ids": top_id[r, :n].clone(), "top_logp": top_lp[r, :n].clone()}
            if norm is not None:
                states[i] = norm.row(r, len(prompts[i]), width, n)
    return out, states  # type: ignore[return-value]


def cached_replies(target, tokenizer, prompts: list[list[int]], cfg: DistillConfig,
                   parts_dir: Path) -> list[dict]:
    """`target_replies` for every prompt, `PART_PROMPTS` prompts per file under `parts_dir`: an
    interrupted run (hours of CPU) resumes from the last finished part."""
    parts_dir.mkdir(parents=True, exist_ok=True)
    data: list[dict] = []
    starts = range(0, len(prompts), PART_PROMPTS)
    for n, start in enumerate(tqdm(starts, desc="target replies (training)", unit="part")):
        chunk_prompts = prompts[start:start + PART_PROMPTS]
        part = parts_dir / f"part-{n:04d}-{len(chunk_prompts)}.pt"  # a count-agnostic cache
        if not part.is_file():
            chunk = target_replies(target, tokenizer, chunk_prompts,
                                   cfg.new_tokens, cfg.gen_batch, cfg.top_logprobs, f"part {n}")
            torch.save(chunk, part.with_suffix(".tmp"))
            part.with_suffix(".tmp").rename(part)
        data.extend(torch.load(part))
    return data


def cached_replies_and_states(target, tokenizer, prompts: list[list[int]], cfg: DistillConfig,
                              parts_dir: Path) -> tuple[list[dict], list[torch.Tensor]]:
    """`cached_replies` and the target's hidden states for each record, kept from the same
    generation and cached where goodspec.training.target_features.cached_features looks for them
    (so reading them back there runs no target): a feature draft's records and features."""
    return _cached_with_states(prompts, parts_dir, "target replies and states (training)", lambda chunk, n: (
        target_replies_and_states(target, tokenizer, chunk, cfg.new_tokens, cfg.gen_batch, cfg.top_logprobs,
                                  f"part {n}")), load_states=True)


def _cached_with_states(items: list, parts_dir: Path, desc: str, make,
                        load_states: bool = False) -> tuple[list[dict], list[torch.Tensor]]:
    """`make(chunk, n)` -> (records, states) for every `PART_PROMPTS` items, each part cached
    under `parts_dir` and its states in target_features' directory beside it (resumable); the
    records, and the states where `load_states` (else [])."""
    from goodspec.training.target_features import features_dir

    states_dir = features_dir(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    states_dir.mkdir(parents=True, exist_ok=True)
    data: list[dict] = []
    all_states: list[torch.Tensor] = []
    for n, start in enumerate(tqdm(range(0, len(items), PART_PROMPTS), desc=desc, unit="part")):
        chunk = items[start:start + PART_PROMPTS]
        part = parts_dir / f"part-{n:04d}-{len(chunk)}.pt"
        if not part.is_file():
            records, states = make(chunk, n)
            for path, value in ((states_dir / part.name, states), (part, records)):  # records last:
                torch.save(value, path.with_suffix(".tmp"))  # a part is done when its records are
                path.with_suffix(".tmp").rename(path)
        data.extend(torch.load(part))
        if load_states:
            all_states.extend(torch.load(states_dir / part.name))
    return data, all_states


def record_sequence(record: dict) -> list[int]:
    """What a draft reads of a record: the prompt and the reply but its last token."""
    return record["prompt"] + record["reply"][:-1]


def right_padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, longest] ids and attention mask, right padding: positions start at 0 in every row."""
    ids = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
    return ids, mask


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices in order of length, cut so that no batch pads past `batch_tokens` tokens."""
    batches, cur = [], []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if cur and lengths[i] * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    return batches + ([cur] if cur else [])


@torch.no_grad()
def teacher_forced(target, pairs: list[tuple[list[int], list[int]]], cfg: DistillConfig,
                   desc: str) -> tuple[list[dict], list[torch.Tensor]]:
    """The target's top-k at every reply position of given (prompt, reply) pairs, one padded
    forward per batch of similar lengths; the same record layout as `target_replies`. Also the
    target's last hidden state at every position each record's draft reads (what
    goodspec.training.target_features would compute: the same forward, so it is kept here)."""
    out: list[dict | None] = [None] * len(pairs)
    states: list[torch.Tensor | None] = [None] * len(pairs)
    seqs = [prompt + reply[:-1] for prompt, reply in pairs]
    for idx in tqdm(length_batches([len(s) for s in seqs], cfg.forced_batch_tokens), desc=desc,
                    unit="batch", leave=False):
        ids, mask = right_padded([seqs[i] for i in idx])
        hidden = target.model(input_ids=ids, attention_mask=mask).last_hidden_state
        for r, i in enumerate(idx):
            prompt, reply = pairs[i]
            h = hidden[r, len(prompt) - 1:len(prompt) - 1 + len(reply)]
            lp, top = F.log_softmax(target.lm_head(h).float(), -1).topk(cfg.top_logprobs, -1)
            out[i] = {"prompt": prompt, "reply": reply, "top_ids": top.to(torch.int32),
                      "top_logp": lp.half()}
            states[i] = hidden[r, :len(seqs[i])].to(torch.bfloat16).clone()
    return out, states  # type: ignore[return-value]


def cached_forced(target, pairs: list[tuple[list[int], list[int]]], cfg: DistillConfig,
                  parts_dir: Path) -> list[dict]:
    """`teacher_forced` for every pair, `PART_PROMPTS` pairs per cached file (resumable); the
    hidden states go where goodspec.training.target_features.cached_features looks for them, so
    the feature draft's training does not run the target over the same text a second time."""
    return _cached_with_states(pairs, parts_dir, "teacher-forced replies (training)",
                               lambda chunk, n: teacher_forced(target, chunk, cfg, f"part {n}"))[0]
