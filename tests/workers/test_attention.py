"""The CPU bfloat16 attention path (two grouped matmuls) against PyTorch's SDPA; the same path
inside a whole forward is checked in test_model_runner."""

import pytest
import torch
import torch.nn.functional as F

from goodspec.workers.attention import _grouped_matmul_attention


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
