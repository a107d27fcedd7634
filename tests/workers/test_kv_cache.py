import pytest
import torch

from goodspec.workers.kv_cache import KVCacheFullError, KVCacheSpec, PagedKVCache, UnknownSequenceError


def make_cache(num_blocks=8, block_size=4) -> PagedKVCache:
    return PagedKVCache(KVCacheSpec(num_layers=2, num_kv_heads=1, head_dim=2, num_blocks=num_blocks,
                                    block_size=block_size), torch.float32, "cpu")


def test_append_allocates_whole_blocks_and_truncate_returns_them():
    c = make_cache()
    c.prepare([("a", 0, 9)])  # 9 tokens -> 3 blocks of 4
    assert c.length("a") == 9 and len(c.block_table("a")) == 3 and c.num_free_blocks == 5
    c.truncate("a", 4)  # rejected draft tokens: back to exactly one full block
    assert c.length("a") == 4 and len(c.block_table("a")) == 1 and c.num_free_blocks == 7
    c.prepare([("a", 4, 1)])
    assert c.length("a") == 5 and c.num_free_blocks == 6


def test_prepare_rolls_back_to_start_pos_before_appending():
    c = make_cache()
    c.prepare([("a", 0, 12)])
    c.prepare([("a", 6, 3)])  # continue at 6: positions 6..8 overwrite the rejected ones
    assert c.length("a") == 9 and len(c.block_table("a")) == 3


def test_full_cache_raises_clear_error_and_changes_nothing():
    c = make_cache(num_blocks=4)
    c.prepare([("a", 0, 8)])
    tables = {"a": list(c.block_table("a"))}
    with pytest.raises(KVCacheFullError, match="needs 4 more blocks .* only 2 of 4 are free"):
        c.prepare([("a", 8, 1), ("b", 0, 9)])
    assert c.length("a") == 8 and c.block_table("a") == tables["a"]
    assert "b" not in c or c.length("b") == 0
    assert c.num_free_blocks == 2


def test_continuing_past_what_is_cached_is_refused():
    c = make_cache()
    c.prepare([("a", 0, 3)])
    with pytest.raises(UnknownSequenceError):
        c.prepare([("a", 5, 1)])
    with pytest.raises(UnknownSequenceError):
        c.prepare([("never-seen", 2, 1)])


def test_free_returns_every_block():
    c = make_cache()
    c.prepare([("a", 0, 10), ("b", 0, 3)])
    c.free("a")
    c.free("b")
    c.free("b")  # idempotent
    assert c.num_free_blocks == 8 and c.seq_ids() == []
