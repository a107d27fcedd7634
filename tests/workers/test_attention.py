"""The CPU bfloat16 attention path (two grouped matmuls) against PyTorch's SDPA; the same path
inside a whole forward is checked in test_model_runner. The uniform metadata (every sequence
appending the same number of tokens) against the general one."""

import pytest
import torch
import torch.nn.functional as F

from goodspec.workers.attention import AttentionMetadata, _grouped_matmul_attention, paged_attention
from goodspec.workers.kv_cache import KVCacheSpec, PagedKVCache


@pytest.mark.parametrize("num_seqs,max_new,ctx", [(1, 1, 17), (5, 1, 48), (4, 6, 64), (2, 33, 40)])
def test_grouped_matmul_attention_equals_sdpa_with_grouped_heads_and_a_mask(num_seqs, max_new, ctx):
    g = torch.Generator().manual_seed(num_seqs * 100 + max_new)
    heads, kv_heads, head_dim = 9, 3, 64
    q = torch.randn(num_seqs, heads, max_new, head_dim, generator=g)
    k = torch.randn(num_seqs, kv_heads, ctx, head_dim, generator=g)
    v = torch.randn(num_seqs, kv_heads, ctx, head_dim, generator=g)
    lengths = torch.randint(max_new, ctx + 1, (num_seqs,), generator=g)  # each sequence's context
    q_pos = lengths[:, None] - max_new + torch.arange(max_new)[None, :]
    mask = (torch.arange(ctx)[None, None, :] <= q_pos[:, :, None]).unsqueeze(1)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = _grouped_matmul_attention(q, k, v, mask, None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got = _grouped_matmul_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, None)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


class _Layer(torch.nn.Module):
    layer_idx = 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("new", [1, 3])
def test_uniform_metadata_is_the_general_one_and_attends_the_same_bit_for_bit(dtype, new):
    """The same number of new tokens a sequence (contexts of different block counts, one crossing
    a block's edge): `uniform` gives `packed`'s slots, positions, tables and mask, and paged
    attention over either writes the same cache and returns the same rows."""
    g = torch.Generator().manual_seed(3)
    spec = KVCacheSpec(num_layers=2, num_kv_heads=3, head_dim=64, num_blocks=64, block_size=16)
    caches = [PagedKVCache(spec, dtype=dtype, device="cpu") for _ in range(2)]
    names, starts = ["a", "b", "c", "d"], [5, 31, 16, 70]
    for cache in caches:
        cache.prepare(list(zip(names, [0] * 4, starts)))
        cache.prepare(list(zip(names, starts, [new] * 4)))
    for key in ("k", "v"):  # the same context in both
        kv = torch.randn(getattr(caches[0], key).shape, generator=g).to(dtype)
        getattr(caches[0], key).copy_(kv), getattr(caches[1], key).copy_(kv)
    tables = [caches[0].block_table(n) for n in names]
    fast, fast_pos = AttentionMetadata.build(caches[0], names, starts, [new] * 4, torch.device("cpu"))
    slow, slow_pos = AttentionMetadata.packed(caches[1], tables, starts, [new] * 4, torch.device("cpu"))
    assert fast.groups[0].unpadded and not slow.groups[0].unpadded and len(slow.groups) == 1
    assert torch.equal(fast_pos, slow_pos) and torch.equal(fast.slot_mapping, slow.slot_mapping)
    for field in ("block_tables", "pad_index", "unpad_index", "mask"):
        assert torch.equal(getattr(fast.groups[0], field), getattr(slow.groups[0], field)), field
    q = torch.randn(1, 9, 4 * new, 64, generator=g).to(dtype)
    k, v = (torch.randn(1, 3, 4 * new, 64, generator=g).to(dtype) for _ in range(2))
    got, _ = paged_attention(_Layer(), q, k, v, None, goodspec_meta=fast)
    want, _ = paged_attention(_Layer(), q, k, v, None, goodspec_meta=slow)
    assert torch.equal(got, want)
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    with pytest.raises(ValueError, match="same number of new tokens"):
        AttentionMetadata.uniform(caches[0], tables, starts, [1, 2, 1, 1], torch.device("cpu"))
