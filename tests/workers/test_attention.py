"""The CPU half-precision attention path (two grouped matmuls) against PyTorch's SDPA."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from goodspec.config import DEFAULT_TARGET
from goodspec.workers.attention import _grouped_matmul_attention
from goodspec.workers.model_runner import ModelRunner, RunnerConfig


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


def test_a_bfloat16_cpu_forward_agrees_with_the_float32_model():
    """A packed bfloat16 forward (prompt chunks, a decode, a verification span) takes the matmul
    path; its logits stay within bfloat16's error of the float32 model's and pick the same token
    almost everywhere (a wrong head grouping or mask would not)."""
    runner = ModelRunner(RunnerConfig(DEFAULT_TARGET, device="cpu", dtype="bfloat16", kv_cache_tokens=1024))
    reference = AutoModelForCausalLM.from_pretrained(DEFAULT_TARGET, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 4000, (n,), generator=g).tolist() for n in (41, 7, 70)]
    first = runner.forward(["a", "b", "c"], [0, 0, 0], [seqs[0][:30], seqs[1][:6], seqs[2][:33]], [30, 1, 2])
    second = runner.forward(["c", "b", "a"], [33, 6, 30], [seqs[2][33:39], seqs[1][6:], seqs[0][30:]],
                            [6, 1, 11])
    with torch.no_grad():
        want = [reference(input_ids=torch.tensor([s])).logits[0] for s in (seqs[0], seqs[1], seqs[2][:39])]
    got = torch.cat([first[:30], second[7:], first[30:31], second[6:7], first[31:33], second[:6]]).float()
    ref = torch.cat([want[0], want[1][5:7], want[2][31:39]])
    assert (got - ref).abs().max() < 0.5 and (got - ref).abs().mean() < 0.05
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95
    runner.free(["a", "b", "c"])
