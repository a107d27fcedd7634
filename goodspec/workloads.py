"""What `goodspec bench` replays: a list of requests, each a prompt, its output length and its
sampling temperature, drawn from ShareGPT or read from a user's JSONL file.

    chat     ShareGPT first turns through the target's chat template, greedy
    copy     requests whose answer copies from the prompt: a ShareGPT reply given back with an
             instruction to repeat, edit or extract from it (where prompt lookup shines)
    sampled  chat requests at temperature 0.7-1.0 (acceptance drops when sampling)
    mixed    the three interleaved in one trace, a third each
    FILE     a JSONL file, one request per line (see `load_jsonl`)
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

WORKLOADS = ("chat", "copy", "sampled", "mixed")
MAX_FILE_REQUESTS = 100_000  # lines of a workload file
MAX_FILE_PROMPT_BYTES = 262_144  # per request, as the server's default max_prompt_bytes
MAX_FILE_NEW_TOKENS = 4096

COPY_INSTRUCTIONS = (
    "Repeat the following text exactly, word for word:",
    "Fix any spelling mistakes in the following text and return the whole text:",
    "Return the following text with every sentence on its own line:",
    "Copy the first half of the following text:",
)


@dataclass(frozen=True)
class WorkloadItem:
    prompt: str
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    kind: str = "chat"


def build_workload(name: str, codec, num: int, seed: int, max_prompt_tokens: int = 384,
                   max_output_tokens: int = 128, chat: bool = True) -> list[WorkloadItem]:
    """`num` requests of the named workload (or of the JSONL file `name`), seeded."""
    if name not in WORKLOADS:
        return load_jsonl(Path(name), codec, num, chat)
    rng = random.Random(seed)
    if name == "mixed":
        parts = [build_workload(k, codec, -(-num // 3), seed + i, max_prompt_tokens, max_output_tokens, chat)
                 for i, k in enumerate(("chat", "copy", "sampled"))]
        items = [it for part in parts for it in part]
        rng.shuffle(items)
        return items[:num]
    pool = _sharegpt_pool(codec, 20 * num, max_prompt_tokens, chat, copy=name == "copy",
                          max_output_tokens=max_output_tokens)
    items = rng.sample(pool, min(num, len(pool)))
    if name == "sampled":
        items = [WorkloadItem(it.prompt, it.max_new_tokens, round(rng.uniform(0.7, 1.0), 2), "sampled")
                 for it in items]
    return items


def _sharegpt_pool(codec, size: int, max_prompt_tokens: int, chat: bool, copy: bool,
                   max_output_tokens: int, min_output_tokens: int = 8) -> list[WorkloadItem]:
    """Chat: each request's output length is the dataset reply's own token length, capped (as
    vLLM's serving benchmark does). Copy: the reply becomes the given text and the output
    length is that text's length, capped."""
    from goodspec.sharegpt import first_turn_prompts

    pool: list[WorkloadItem] = []
    # Held-out conversations only: the shipped drafts were trained on the others.
    for i, (prompt, reply) in enumerate(first_turn_prompts(held_out=True)):
        if copy:
            prompt = f"{COPY_INSTRUCTIONS[i % len(COPY_INSTRUCTIONS)]}\n\n{reply}"
        text = codec.render_chat([("user", prompt)]) if chat else prompt
        if len(codec.encode(text)) > max_prompt_tokens:
            continue
        n_out = min(max_output_tokens, len(codec.encode(reply)))
        if n_out >= min_output_tokens:
            pool.append(WorkloadItem(text, n_out, 0.0, "copy" if copy else "chat"))
        if len(pool) >= size:
            break
    return pool


def load_jsonl(path: Path, codec, num: int, chat: bool) -> list[WorkloadItem]:
    """One request per line: {"prompt": str} or {"messages": [{"role", "content"}, ...]}, with
    "max_new_tokens" (int, 1..4096) and optionally "temperature" (0..2) and "kind" (a label for
    the report). The first `num` lines are used; a bad line is an error naming it."""
    if not path.is_file():
        raise ValueError(f"--workload {str(path)!r}: not one of {', '.join(WORKLOADS)} and not a file")
    items: list[WorkloadItem] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if len(items) >= min(num, MAX_FILE_REQUESTS):
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e})") from None
            items.append(_item(row, where, codec, chat))
    if not items:
        raise ValueError(f"{path}: no requests")
    return items


def _item(row, where: str, codec, chat: bool) -> WorkloadItem:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object")
    unknown = set(row) - {"prompt", "messages", "max_new_tokens", "temperature", "kind"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    if ("prompt" in row) == ("messages" in row):
        raise ValueError(f"{where}: set exactly one of prompt, messages")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise ValueError(f"{where}: messages must be a non-empty list of {{role, content}} strings")
        prompt = codec.render_chat([(m["role"], m["content"]) for m in msgs])
    else:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise ValueError(f"{where}: prompt must be a non-empty string")
        prompt = codec.render_chat([("user", row["prompt"])]) if chat else row["prompt"]
    if len(prompt.encode()) > MAX_FILE_PROMPT_BYTES:
        raise ValueError(f"{where}: prompt over {MAX_FILE_PROMPT_BYTES} bytes")
    n = row.get("max_new_tokens")
    if type(n) is not int or not 1 <= n <= MAX_FILE_NEW_TOKENS:
        raise ValueError(f"{where}: max_new_tokens must be an integer in 1..{MAX_FILE_NEW_TOKENS}")
    t = row.get("temperature", 0.0)
    if type(t) not in (int, float) or not 0.0 <= t <= 2.0:
        raise ValueError(f"{where}: temperature must be a number in 0..2")
    kind = row.get("kind", "file")
    if not isinstance(kind, str) or len(kind) > 32:
        raise ValueError(f"{where}: kind must be a string of at most 32 characters")
    return WorkloadItem(prompt, n, float(t), kind)
