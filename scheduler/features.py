"""The target's hidden states of one request that a feature draft has yet to read.

A feature draft (goodspec.workers.feature_draft) reads, beside the token at position p, the
target's last hidden state at p - 1. The target computes it when it verifies (or prefills) the
token at p - 1 and hands it back with the step's result; the draft reads it on its next
proposal. This buffer carries the rows in between and drops them once read, so a request holds
the few rows of one step, not its whole context (a prompt's rows until its first proposal).
A row it no longer holds (the draft lost its cache and starts over) reads as zeros: the draft
then guesses worse for that request, and output is unchanged, since the target verifies all.
"""

from __future__ import annotations

import torch


class FeatureBuffer:
    def __init__(self) -> None:
        self.first = 0  # position of rows[0]
        self.rows: torch.Tensor | None = None  # [n, d]

    @property
    def end(self) -> int:
        return self.first + (0 if self.rows is None else len(self.rows))

    def put(self, start: int, rows: torch.Tensor) -> None:
        """The target's rows for positions start.. (rows past `start` that it held before were
        computed for tokens since rolled back: replaced)."""
        if len(rows) == 0:
            return
        if self.rows is None or start < self.first or start > self.end:
            self.first, self.rows = start, rows
            return
        self.rows = torch.cat([self.rows[: start - self.first], rows])

    def take(self, start: int, count: int, width: int) -> torch.Tensor:
        """The features of `count` tokens from position `start` on: the rows of positions
        start - 1 .. start + count - 2, zero where not held (position -1 is always zero)."""
        # (bfloat16, what the target sends, so one batch's rows share a dtype)
        out = torch.zeros(count, width, dtype=torch.bfloat16 if self.rows is None else self.rows.dtype)
        if self.rows is None:
            return out
        lo, hi = max(start - 1, self.first), min(start - 1 + count, self.end)
        if lo < hi:
            out[lo - (start - 1): hi - (start - 1)] = self.rows[lo - self.first: hi - self.first]
        return out

    def drop_before(self, position: int) -> None:
        if self.rows is None or position <= self.first:
            return
        self.rows = self.rows[position - self.first:] if position < self.end else None
        self.first = position if self.rows is not None else 0

    def clear(self) -> None:
        self.first, self.rows = 0, None
