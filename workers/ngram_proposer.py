"""Prompt-lookup proposer: no model, no cache. It finds the latest earlier occurrence of the
context's last n tokens (n from max_ngram down to min_ngram) and proposes what followed it.

Its proposal is deterministic, so its q is the one-hot of each proposed token; rejection
sampling with a one-hot q is still exact (accept with p(d), else resample from p without d).
"""

from __future__ import annotations

import time

import numpy as np

from goodspec.workers.messages import ProposeBatch, Proposal


class NgramProposer:
    stateless = True  # the scheduler sends every item's whole context, from position 0

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram; got {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, batch: ProposeBatch) -> Proposal:
        t0 = time.perf_counter()
        ids = [self._lookup(np.asarray(it.token_ids, dtype=np.int64), it.num_draft) for it in batch.items]
        return Proposal(draft_ids=ids, draft_probs=None, elapsed_s=time.perf_counter() - t0)

    def _lookup(self, ctx: np.ndarray, k: int) -> list[int]:
        n_ctx = len(ctx)
        for n in range(min(self.max_ngram, n_ctx - 1), self.min_ngram - 1, -1):
            tail = ctx[n_ctx - n:]
            # All windows of length n that end before the tail starts, compared at once.
            windows = np.lib.stride_tricks.sliding_window_view(ctx[: n_ctx - 1], n)
            hits = np.flatnonzero((windows == tail).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n  # the token after the most recent match
                follow = ctx[start: start + k].tolist()
                if follow:
                    return follow + [follow[-1]] * (k - len(follow))
        return [int(ctx[-1])] * k  # nothing matched: a repeat is a cheap, usually rejected guess

    def free(self, req_ids: list[str]) -> None:
        pass
