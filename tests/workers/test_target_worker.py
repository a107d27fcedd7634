"""The target worker's verification of sampled proposals whose q comes over a draft's reduced
vocabulary (FR-Spec): it must verify exactly as the same q spread over the target's tokens."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig

from goodspec.config import DEFAULT_TARGET
from goodspec.workers.messages import Proposal, VerifyBatch, VerifyItem
from goodspec.workers.model_runner import RunnerConfig, VocabMap
from goodspec.workers.sampling import SamplingParams
from goodspec.workers.target_worker import TargetWorker

DRAFT_VOCAB = 300
K = 3


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    vocab = AutoConfig.from_pretrained(DEFAULT_TARGET).vocab_size
    ids = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))[:DRAFT_VOCAB].sort().values
    out = tmp_path_factory.mktemp("draft")
    (out / "vocab_map.json").write_text(json.dumps({"target_vocab_size": vocab, "target_ids": ids.tolist()}))
    return out


@pytest.fixture(scope="module")
def workers(draft_dir):
    config = RunnerConfig(DEFAULT_TARGET, "cpu", "float32", 4096)
    return TargetWorker(config, str(draft_dir)), TargetWorker(config)


def _verify(worker, seed: int, q: torch.Tensor, drafts: list[list[int]]):
    """Two sampled requests on the draft's q and a third whose tokens came from prompt lookup
    (no row in q: its q is the one-hot of its tokens)."""
    items = [VerifyItem(f"s{seed}-{i}", 0, [1, 40 + i, 7, 99], True,
                        SamplingParams(temperature=1.0, seed=seed * 10 + i), d, proposal_row=i)
             for i, d in enumerate(drafts)]
    result = worker.verify(VerifyBatch(items, Proposal(drafts, q)))
    worker.free([it.req_id for it in items])
    return result.num_accepted, result.output_ids


def test_q_over_the_drafts_vocabulary_verifies_as_the_same_q_over_the_targets(workers, draft_dir):
    reduced, full = workers
    vmap = VocabMap.load(draft_dir, torch.device("cpu"))
    lookup_tokens = [5, 6, 7]
    accepted_any = rejected_any = False
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        # A peaked q (as a trained draft's): some drafts are accepted, some are not.
        q = torch.softmax(4 * torch.randn(2, K, DRAFT_VOCAB, generator=g), -1)
        columns = torch.multinomial(q.view(-1, DRAFT_VOCAB), 1, generator=g).view(2, K)
        drafts = vmap.target_ids[columns].tolist() + [lookup_tokens]
        wide = vmap.to_target(q.view(-1, DRAFT_VOCAB), 0.0).view(2, K, -1)
        got = _verify(reduced, seed, q, drafts)
        assert got == _verify(full, seed, wide, drafts)
        accepted_any |= any(a > 0 for a in got[0])
        rejected_any |= any(a < K for a in got[0])
        # The mapping matters: q read as if its columns were the target's first ids differs.
        if seed == 0:
            shifted = torch.zeros_like(wide)
            shifted[..., :DRAFT_VOCAB] = q
            assert _verify(full, seed, shifted, drafts) != got
    assert accepted_any and rejected_any


def test_q_of_the_wrong_width_is_refused_before_any_cache_moves(workers):
    reduced, _ = workers
    with pytest.raises(ValueError, match="columns"):
        _verify(reduced, 99, torch.full((2, K, DRAFT_VOCAB + 1), 1.0 / DRAFT_VOCAB), [[5] * K, [6] * K, [7]])
    assert reduced.runner.cache.num_used_blocks == 0  # nothing was appended for the refused batch


def test_greedy_and_sampled_rows_in_one_batch_verify_as_each_would_alone(workers, draft_dir):
    """Greedy rows are verified by argmax and sampled rows by the rejection sampler, apart: a
    batch that mixes them (and rows of different k, and a plain decode) gives every row what a
    batch of that row alone gives."""
    reduced, _ = workers
    vmap = VocabMap.load(draft_dir, torch.device("cpu"))
    g = torch.Generator().manual_seed(7)
    q = torch.softmax(4 * torch.randn(4, K, DRAFT_VOCAB, generator=g), -1)
    drafts = vmap.target_ids[torch.multinomial(q.view(-1, DRAFT_VOCAB), 1, generator=g).view(4, K)].tolist()
    drafts[1], drafts[3] = drafts[1][:2], []  # k = 2, and a decode without drafts
    temps = [1.0, 0.0, 0.8, 0.0]

    def items(rows):
        return [VerifyItem(f"m{i}", 0, [1, 40 + i, 7, 99], True, SamplingParams(temperature=temps[i], seed=100 + i),
                           drafts[i], proposal_row=i) for i in rows]

    def verify(rows):
        batch = items(rows)
        result = reduced.verify(VerifyBatch(batch, Proposal([drafts[i] for i in range(4)], q)))
        reduced.free([it.req_id for it in batch])
        return list(zip(result.num_accepted, result.output_ids))

    together = verify([0, 1, 2, 3])
    assert together == [verify([i])[0] for i in range(4)]
    assert together[3][0] == 0 and len(together[3][1]) == 1
