"""Start-up profiling sweep: a few seconds of synthetic steps through the real workers, so the
goodput model's step-time fit starts from measurements of this machine, not from nothing.
Results are cached on disk per model pair and device and reused when the key matches."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Sequence

from goodspec.scheduler.step_record import StepRecord
from goodspec.workers.messages import ProposeBatch, ProposeItem, VerifyBatch, VerifyItem
from goodspec.workers.sampling import SamplingParams

CACHE_DIR = Path(os.environ.get("GOODSPEC_CACHE", Path.home() / ".cache" / "goodspec")) / "profiles"
# Part of every key: raised when what a sweep records changes (2: with proposer ngram the
# verified tokens are lookup's, not a draft worker's; 3: packed oneDNN linears, which changed
# every CPU step time), so an older cache is not read as new.
SWEEP_VERSION = 3


def device_key(target: tuple[str, str, int], draft: tuple[str, str, int] | None, runtime: str,
               huge_pages: bool) -> list[str]:
    """What a step-time profile depends on beside the model directories: each worker's
    (device, weights: its dtype or int8, how many oneDNN linears it packed), the runtime
    ("in-process" or "ray") and whether the target's allocator takes huge pages (its steps cost
    less with them: goodspec.workers.huge_pages)."""
    workers = [("target", target)] + ([("draft", draft)] if draft is not None else [])
    return [f"{role}={device},{weights},onednn_linears={onednn}" for role, (device, weights, onednn) in workers] + \
        [runtime, f"huge_pages={huge_pages}"]


def profile_key(*parts: object) -> str:
    """Model directories (with their weights' size and mtime), device and anything else given."""
    items = [f"sweep v{SWEEP_VERSION}"]
    for p in parts:
        path = Path(str(p)) if p is not None else None
        if path is not None and path.is_dir():
            w = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
            items.append(f"{path.resolve()}|" + "|".join(f"{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in w))
        else:
            items.append(str(p))
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:20]


def load_cached(key: str) -> list[StepRecord] | None:
    path = CACHE_DIR / f"{key}.json"
    try:
        return [StepRecord(**d) for d in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):
        return None


def save_cached(key: str, records: Sequence[StepRecord]) -> None:
    try:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = CACHE_DIR / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps([r.to_dict() for r in records]))
        tmp.replace(CACHE_DIR / f"{key}.json")
    except OSError:
        pass  # a read-only home only costs a re-profile next time


SWEEP_BATCH_SIZES = (1, 4, 8, 16, 32)
SWEEP_KS = (0, 1, 2, 3, 5, 8)
SWEEP_CONTEXTS = (64, 320)


def swept_shapes(kv_tokens: int, max_k: int, batch_sizes: Sequence[int] = SWEEP_BATCH_SIZES,
                 ks: Sequence[int] = SWEEP_KS, contexts: Sequence[int] = SWEEP_CONTEXTS) -> list[tuple[int, int]]:
    """The (context, batch size) pairs a sweep measures: those whose sequences fit in the KV
    budget at the deepest k swept."""
    deepest = max(k for k in ks if k <= max_k)
    return [(ctx, b) for ctx in contexts for b in batch_sizes if b * (ctx + deepest + 2) <= kv_tokens]


def profile_step_times(
    target, draft, kv_tokens: int, max_k: int,
    batch_sizes: Sequence[int] = SWEEP_BATCH_SIZES,
    ks: Sequence[int] = SWEEP_KS,
    contexts: Sequence[int] = SWEEP_CONTEXTS,
    repeats: int = 2,
) -> list[StepRecord]:
    """Uniform-k decode steps on synthetic sequences; each repeat rolls both caches back through
    start_pos, exactly like a rejected speculation does. With no draft model (prompt lookup
    proposes: free) the k tokens verified are the last token repeated: only how many matters."""
    records: list[StepRecord] = []
    greedy = SamplingParams(max_new_tokens=1, seed=0)
    shapes = swept_shapes(kv_tokens, max_k, batch_sizes, ks, contexts)
    ks = [k for k in ks if k <= max_k]
    for ctx, b in shapes:
        ids = [f"__profile-{ctx}-{b}-{i}" for i in range(b)]
        tokens = [[3 + (17 * i + 5 * j) % 997 for j in range(ctx)] for i in range(b)]
        try:
            target.verify(VerifyBatch([VerifyItem(r, 0, t[:-1], False, greedy) for r, t in zip(ids, tokens)]))
            if draft is not None:
                draft.propose(ProposeBatch([ProposeItem(r, 0, t[:-1], 1, greedy) for r, t in zip(ids, tokens)]))
            for _ in range(repeats):
                for k in ks:
                    records.append(_one_step(target, draft, ids, tokens, k, greedy))
        finally:
            target.free(ids)
            if draft is not None:
                draft.free(ids)
    return records


def _one_step(target, draft, ids, tokens, k, greedy) -> StepRecord:
    ctx = len(tokens[0])
    t_start = time.perf_counter()
    drafts = [[t[-1]] * k for t in tokens]  # without a draft model: lookup's tokens, free
    t_draft = 0.0
    compute_d = 0.0
    if k > 0 and draft is not None:
        t0 = time.perf_counter()
        prop = draft.propose(ProposeBatch([ProposeItem(r, ctx - 1, t[ctx - 1:], k, greedy) for r, t in zip(ids, tokens)]))
        t_draft = time.perf_counter() - t0
        drafts, compute_d = prop.draft_ids, prop.elapsed_s
    t0 = time.perf_counter()
    res = target.verify(VerifyBatch([VerifyItem(r, ctx - 1, t[-1:], True, greedy, d)
                                     for r, t, d in zip(ids, tokens, drafts)]))
    t_verify = time.perf_counter() - t0
    b = len(ids)
    return StepRecord(
        batch_size=b, num_decode=b, num_draft_reqs=b if k else 0,
        draft_tokens=k * b if draft is not None else 0,
        verify_tokens=(k + 1) * b, context_tokens=ctx * b, max_context=ctx + k, max_k=k if draft is not None else 0,
        num_accepted=sum(res.num_accepted), draft_time=t_draft, verify_time=t_verify,
        draft_compute_time=compute_d, verify_compute_time=res.elapsed_s,
        step_time=time.perf_counter() - t_start, ks=[k] * b, lookup_tokens=0 if draft is not None else k * b,
    )


def warm_up_goodput(scheduler, kv_tokens: int, key_parts: Sequence[object], sweep: bool = True) -> list[StepRecord]:
    """Give the scheduler's goodput policies a step-time model before the first request:
    from the disk cache when the key matches, else from a fresh sweep (then cached)."""
    if scheduler.draft is None and not scheduler.proposers.lookup:
        return []
    # A small KV budget sweeps fewer batch sizes: its profile must not seed a larger engine.
    max_k = scheduler.config.max_k
    key = profile_key(*key_parts, max_k, f"shapes={swept_shapes(kv_tokens, max_k)}")
    records = load_cached(key)
    if records is None and sweep:
        records = profile_step_times(scheduler.target, scheduler.draft, kv_tokens, max_k)
        save_cached(key, records)
    scheduler.policies.seed(records or [])
    return scheduler.policies.profile_records
