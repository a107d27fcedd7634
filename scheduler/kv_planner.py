"""KV block accounting over the running requests, for admission and for a step's plan.

The budgets are the workers' (fixed at start-up); the requests and their cache lengths are the
scheduler's. These checks only read both: the scheduler decides what to do when they fail.
"""

from __future__ import annotations

from typing import Collection, Sequence

from goodspec.scheduler.config import KVBudget
from goodspec.scheduler.request import Request


class KVPlanner:
    def __init__(self, target_kv: KVBudget, draft_kv: KVBudget | None) -> None:
        self.target_kv, self.draft_kv = target_kv, draft_kv

    def too_large(self, need_tokens: int) -> str | None:
        """Why a request that may grow to `need_tokens` can never fit, or None."""
        for name, kv in (("target", self.target_kv), ("draft", self.draft_kv)):
            if kv is not None and kv.blocks(need_tokens) > kv.num_blocks:
                return (f"request needs up to {need_tokens} tokens of {name} KV cache but the whole "
                        f"budget is {kv.tokens} tokens; shorten the prompt or max_new_tokens, or "
                        f"raise kv_cache_tokens")
        return None

    def can_admit(self, req: Request, running: Sequence[Request], uses_draft: bool) -> bool:
        """Room for the prompt and its first token in both caches, keeping one block of growth
        per running request, so admitting it does not force a preemption right away."""
        need = len(req.token_ids) + 1
        reserve = len(running)
        if self._free(self.target_kv, running, "target_len") - reserve < self.target_kv.blocks(need):
            return False
        return not (self.draft_kv is not None and uses_draft and
                    self._free(self.draft_kv, running, "draft_len") - reserve < self.draft_kv.blocks(need))

    def fits(self, running: Sequence[Request], ks: dict[str, int], chunks: dict[str, int],
             lookup: Collection[str] = ()) -> bool:
        """Whether the step planned (k per decoding request, prompt tokens per prefilling one)
        fits both caches once its tokens are in. The requests in `lookup` take their k tokens
        from prompt lookup: the draft model's cache does not grow for them."""
        t_used = d_used = 0
        for r in running:
            t_len, d_len = r.target_len, r.draft_len
            if r.req_id in ks:
                k = ks[r.req_id]
                t_len = len(r.token_ids) + k
                if k > 0 and r.req_id not in lookup:
                    d_len = len(r.token_ids) + k - 1
            elif r.req_id in chunks:
                t_len += chunks[r.req_id]
            t_used += self.target_kv.blocks(t_len)
            if self.draft_kv is not None:
                d_used += self.draft_kv.blocks(d_len)
        if t_used > self.target_kv.num_blocks:
            return False
        return self.draft_kv is None or d_used <= self.draft_kv.num_blocks

    def used(self, running: Sequence[Request]) -> tuple[int, int]:
        """Blocks held now: (target, draft)."""
        t = sum(self.target_kv.blocks(r.target_len) for r in running)
        d = sum(self.draft_kv.blocks(r.draft_len) for r in running) if self.draft_kv else 0
        return t, d

    @staticmethod
    def _free(kv: KVBudget, running: Sequence[Request], attr: str) -> int:
        return kv.num_blocks - sum(kv.blocks(getattr(r, attr)) for r in running)
