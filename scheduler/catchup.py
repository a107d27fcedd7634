"""What a draft's catch-up is charged to the step that pays it.

A request that has not speculated for a while (or at all: a new request's whole prompt) makes the
draft process every token it missed before its first proposal. That cost is paid once and lets
the request speculate from then on, so charging all of it to the step that pays it made k = 0
look best at high load for every new request, and every k = 0 step grew the backlog (requests
locked into k = 0 while fixed:3 was 13% faster than off). It is spread instead over the
speculative steps the request can expect in the rest of its life, and those are not every step
it has left: only as many as requests whose draft is caught up do speculate. Spread over every
remaining step, at saturation (where caught-up requests mostly chose k = 0) each prompt's
catch-up looked nearly free, was paid, and bought a step or two of speculation: one server at
32 req/s caught its draft up on 5430-5680 tokens per three replays of 24 requests, every prompt
and more (BENCHMARKS.md, twenty-sixth session).
"""

from __future__ import annotations

from typing import Sequence


class CatchUpPricing:
    DECAY = 0.95  # per step: the share follows about the last 20 steps

    def __init__(self) -> None:
        # Decayed counts of request-steps whose draft was caught up, and of those the draft
        # model speculated for; at first, as if every one did (the old charge).
        self.seen = 1.0
        self.speculated = 1.0

    @property
    def share(self) -> float:
        """How often a request whose draft is caught up speculates with the draft model."""
        return self.speculated / self.seen

    def spread(self, catchups: Sequence[int], remaining: Sequence[int], expected: Sequence[float]) -> list[float]:
        """Each request's catch-up tokens as charged to this step: `catchups[i]` over the
        speculative steps among the ones its `remaining[i]` tokens take, when a speculative step
        emits `expected[i]` tokens and any other step one, and a `share` of them speculate."""
        p = self.share
        return [c / max(1.0, p * r / (p * e + 1.0 - p)) if c else 0.0
                for c, r, e in zip(catchups, remaining, expected)]

    def count(self, catchups: Sequence[int], caps: Sequence[int], ks: Sequence[int],
              lookup: Sequence[bool]) -> None:
        """One step's choice: of its requests whose draft had nothing to catch up on (at most
        the one token it could not see, its last proposal when all of it was accepted) and that
        could speculate, those the draft model speculated for (prompt lookup leaves the draft
        behind)."""
        seen = speculated = 0
        for c, cap, k, lk in zip(catchups, caps, ks, lookup):
            if c <= 1 and cap > 0:
                seen += 1
                speculated += k > 0 and not lk
        if seen:
            self.seen = self.seen * self.DECAY + seen
            self.speculated = self.speculated * self.DECAY + speculated
