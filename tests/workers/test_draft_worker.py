"""The draft worker stopping a request's drafting early (DraftStop), on the shipped tiny draft."""

from __future__ import annotations

import pytest

from goodspec.config import DEFAULT_DRAFT
from goodspec.workers.draft_worker import DraftWorker
from goodspec.workers.messages import CONFIDENCE_BINS, DraftStop, ProposeBatch, ProposeItem
from goodspec.workers.runner_config import RunnerConfig
from goodspec.workers.sampling import SamplingParams

GREEDY = SamplingParams(seed=7)
PROMPTS = ([5, 9, 33, 71, 12, 40], [8, 8, 100, 3], [61, 2, 19])


@pytest.fixture(scope="module")
def draft():
    return DraftWorker(RunnerConfig(model_dir=DEFAULT_DRAFT, device="cpu", dtype="float32", kv_cache_tokens=4096))


def _propose(draft, ks, may_stop, stop=None, tag="a"):
    """One proposal for len(ks) fresh requests (their caches freed after)."""
    items = [ProposeItem(f"{tag}{i}", 0, list(PROMPTS[i]), k, GREEDY, m)
             for i, (k, m) in enumerate(zip(ks, may_stop))]
    try:
        return draft.propose(ProposeBatch(items, None, stop))
    finally:
        draft.free([it.req_id for it in items])


def _flat(rate: float, row_cost: float, pass_cost: float) -> DraftStop:
    """Every confidence worth `rate`: reach after j positions is rate ** j, whatever was drafted."""
    rates = (rate,) * CONFIDENCE_BINS
    return DraftStop((rates, rates), (1.0, 1.0), row_cost, pass_cost)


def test_a_row_drafts_on_while_its_reach_pays_for_its_share_of_the_pass(draft):
    """reach 0.5, 0.25, ...; a position costs 0.2 for the row plus 0.5 for the pass, split among
    the rows that draft it."""
    full = _propose(draft, [4, 4], [False, False])
    stop = _flat(0.5, 0.2, 0.5)
    alone = _propose(draft, [4], [True], stop)  # 0.5 < 0.2 + 0.5: stops after one
    assert alone.draft_ids == [full.draft_ids[0][:1]]
    pair = _propose(draft, [4, 4], [True, True], stop)  # 0.5 >= 0.2 + 0.25, then 0.25 < 0.45
    assert pair.draft_ids == [ids[:2] for ids in full.draft_ids]
    assert [len(c) for c in pair.draft_conf] == [2, 2]
    # Beside a row that drafts its k regardless, the pass is paid: 0.5, 0.25 >= 0.2 > 0.125.
    mixed = _propose(draft, [4, 4], [True, False], stop)
    assert mixed.draft_ids == [full.draft_ids[0][:3], full.draft_ids[1]]


def test_no_stop_and_a_stop_that_always_pays_draft_every_k(draft):
    full = _propose(draft, [3, 5, 1], [False] * 3)
    assert [len(ids) for ids in full.draft_ids] == [3, 5, 1]
    assert _propose(draft, [3, 5, 1], [True] * 3, _flat(1.0, 0.0, 0.0)).draft_ids == full.draft_ids
    # A row that may not stop ignores a stop that ends every other row at once.
    never = _propose(draft, [3, 5, 1], [True, False, True], _flat(0.0, 1.0, 1.0))
    assert never.draft_ids == [full.draft_ids[0][:1], full.draft_ids[1], full.draft_ids[2]]


def test_the_draft_stops_where_its_own_confidence_is_low(draft):
    """Rates by bin (a confidence c is worth about c): with a row cost between the draft's
    confidences, the rows stop exactly after the first position whose reach falls below it."""
    full = _propose(draft, [6, 6, 6], [False] * 3)
    rates = tuple((b + 0.5) / CONFIDENCE_BINS for b in range(CONFIDENCE_BINS))
    stop = DraftStop((rates, rates), (1.0, 1.0), 0.3, 0.0)
    got = _propose(draft, [6, 6, 6], [True] * 3, stop)
    for ids, conf, got_ids in zip(full.draft_ids, full.draft_conf, got.draft_ids):
        reach, n = 1.0, 0
        while n < len(ids):
            n += 1
            reach *= rates[min(int(conf[n - 1] * CONFIDENCE_BINS), CONFIDENCE_BINS - 1)]
            if reach < 0.3:
                break
        assert got_ids == ids[:n]
    assert any(len(g) < 6 for g in got.draft_ids)  # the draft is not that sure of everything
