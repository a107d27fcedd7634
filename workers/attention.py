"""Batched attention over the paged KV cache, plugged into transformers' AttentionInterface.

The model runs one packed batch: every sequence's new tokens are laid end to end as a batch of
one, `[1, num_tokens]`, with explicit position ids, so a 300-token prompt chunk, a 1-token decode
and a 6-token verification share one forward without padding the MLPs. Attention is the only
place sequences must be told apart: each layer writes its new K/V into the cache slots of its
sequence, gathers each sequence's whole context through its block table, and runs SDPA on a
`[num_seqs, max_new, max_context]` causal mask (in bfloat16 on a CPU, two grouped matmuls
instead: see `_grouped_matmul_attention`). Everything here is tensor ops prepared once per
forward (`AttentionMetadata`) and reused by every layer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface

from goodspec.workers.kv_cache import PagedKVCache

ATTENTION_NAME = "goodspec_paged"

# On CUDA, PyTorch's first choice for a masked bfloat16 SDPA on Hopper is cuDNN's kernel, which
# builds an execution plan for every new (num_seqs, max_new, max_context) shape it meets: steps of
# 100-200 ms on an H100 where the step itself takes 20. Per-request k meets new shapes every step,
# so under it goodput ran 2.5x slower than off (measured; BENCHMARKS.md, "GPU path"). The
# memory-efficient kernel takes any shape with no plan to build (but not enable_gqa: on CUDA the
# KV heads are repeated for it); math is the fallback.
CUDA_SDPA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class AttentionMetadata:
    cache: PagedKVCache
    slot_mapping: torch.Tensor  # [num_tokens] flat cache slot of each new token
    block_tables: torch.Tensor  # [num_seqs, max_blocks]
    pad_index: torch.Tensor  # [num_seqs, max_new] packed index of each padded query (num_tokens = pad)
    unpad_index: torch.Tensor  # [num_tokens] index into the flattened [num_seqs * max_new]
    mask: torch.Tensor  # [num_seqs, 1, max_new, max_context] True where attention is allowed

    @classmethod
    def build(
        cls, cache: PagedKVCache, seq_ids: list[str], starts: list[int], num_new: list[int],
        device: torch.device,
    ) -> tuple["AttentionMetadata", torch.Tensor]:
        """Metadata for one packed forward, and the packed position ids `[num_tokens]`.
        The sequences must already be sized in the cache (`PagedKVCache.prepare`)."""
        bs = cache.spec.block_size
        num_seqs = len(seq_ids)
        tables = [cache.block_table(s) for s in seq_ids]
        max_blocks = max(len(t) for t in tables)
        block_tables = torch.tensor(
            [t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.long
        )
        q_lens = torch.tensor(num_new, dtype=torch.long)
        start_t = torch.tensor(starts, dtype=torch.long)
        total = int(q_lens.sum())
        max_new = int(q_lens.max())
        seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), q_lens)  # [num_tokens]
        cu = torch.cumsum(q_lens, 0) - q_lens  # first packed index of each sequence
        offset = torch.arange(total) - cu[seq_of_token]  # index within the sequence's new tokens
        positions = start_t[seq_of_token] + offset
        slot_mapping = block_tables[seq_of_token, positions // bs] * bs + positions % bs

        j = torch.arange(max_new)
        valid = j[None, :] < q_lens[:, None]  # [num_seqs, max_new]
        pad_index = torch.where(valid, cu[:, None] + j[None, :], torch.full_like(valid, total, dtype=torch.long))
        unpad_index = seq_of_token * max_new + offset
        # A padded query row attends like the sequence's last real query, so no row is all-masked.
        q_pos = start_t[:, None] + torch.minimum(j[None, :], (q_lens - 1)[:, None])
        key_pos = torch.arange(max_blocks * bs)
        mask = (key_pos[None, None, :] <= q_pos[:, :, None]).unsqueeze(1)
        meta = cls(
            cache=cache,
            slot_mapping=slot_mapping.to(device),
            block_tables=block_tables.to(device),
            pad_index=pad_index.to(device),
            unpad_index=unpad_index.to(device),
            mask=mask.to(device),
        )
        return meta, positions.to(device)


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, num_heads, num_tokens, head_dim]
    key: torch.Tensor,  # [1, num_kv_heads, num_tokens, head_dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    goodspec_meta: AttentionMetadata | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    meta = goodspec_meta
    if meta is None:
        raise RuntimeError(f"the {ATTENTION_NAME!r} attention runs only inside goodspec's ModelRunner")
    cache = meta.cache
    layer = module.layer_idx
    num_kv_heads, head_dim = key.shape[1], key.shape[3]
    k_layer, v_layer = cache.k[layer], cache.v[layer]  # [num_blocks, block_size, kv_heads, head_dim]
    k_layer.view(-1, num_kv_heads, head_dim)[meta.slot_mapping] = key[0].transpose(0, 1)
    v_layer.view(-1, num_kv_heads, head_dim)[meta.slot_mapping] = value[0].transpose(0, 1)

    num_seqs = meta.block_tables.shape[0]
    # [num_seqs, kv_heads, max_context, head_dim]
    k_ctx = k_layer[meta.block_tables].view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    v_ctx = v_layer[meta.block_tables].view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    q = query[0].transpose(0, 1)  # [num_tokens, heads, head_dim]
    q = torch.cat([q, q.new_zeros(1, *q.shape[1:])])[meta.pad_index]  # [num_seqs, max_new, heads, hd]
    gqa = q.shape[2] != num_kv_heads
    if gqa and q.is_cuda:  # the memory-efficient kernel takes no enable_gqa: give it every head
        k_ctx = k_ctx.repeat_interleave(q.shape[2] // num_kv_heads, dim=1)
        v_ctx = v_ctx.repeat_interleave(q.shape[2] // num_kv_heads, dim=1)
        gqa = False
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        out = _grouped_matmul_attention(q.transpose(1, 2), k_ctx, v_ctx, meta.mask, scaling)
    else:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k_ctx, v_ctx, attn_mask=meta.mask, scale=scaling, enable_gqa=gqa,
        )  # [num_seqs, heads, max_new, head_dim]
    out = out.transpose(1, 2).reshape(-1, out.shape[1], head_dim)[meta.unpad_index]
    return out.unsqueeze(0), None  # [1, num_tokens, heads, head_dim]


def _grouped_matmul_attention(
    q: torch.Tensor,  # [num_seqs, heads, max_new, head_dim]
    k: torch.Tensor,  # [num_seqs, kv_heads, max_context, head_dim]
    v: torch.Tensor,
    mask: torch.Tensor,  # [num_seqs, 1, max_new, max_context]
    scaling: float | None,
) -> torch.Tensor:
    """Attention as two batched matmuls with each KV head's query heads stacked, softmax in
    float32 (as transformers' eager attention does). Why not SDPA: on a CPU, PyTorch's flash
    kernel in bfloat16 takes 1.1-2.3 ms a layer for 16-32 sequences of one new token and 200 of
    context, where these two matmuls take 0.13-0.19 (this machine: AVX-512 bf16, no AMX; float32
    SDPA 0.15-0.33): it was 59% of a bfloat16 decode step. float32 keeps SDPA, the kernel its
    exactness tests ran on; float16 on a CPU was not measured and keeps it too. transformers'
    eager attention computes the same thing but first copies K and V once per query head
    (repeat_kv) and takes an additive float mask; stacking the query heads avoids both."""
    num_seqs, heads, max_new, head_dim = q.shape
    kv_heads, ctx = k.shape[1], k.shape[2]
    group = heads // kv_heads  # query head h reads KV head h // group, as repeat_interleave does
    scale = head_dim ** -0.5 if scaling is None else scaling
    scores = torch.matmul(q.reshape(num_seqs, kv_heads, group * max_new, head_dim), k.transpose(-1, -2))
    scores = scores.float().mul_(scale).view(num_seqs, kv_heads, group, max_new, ctx)
    scores.masked_fill_(~mask.view(num_seqs, 1, 1, max_new, ctx), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype).view(num_seqs, kv_heads, group * max_new, ctx)
    return torch.matmul(probs, v).view(num_seqs, heads, max_new, head_dim)


def attention_backends(device: torch.device):
    """The SDPA kernels a forward on `device` may use (all of them off CUDA)."""
    return sdpa_kernel(CUDA_SDPA_BACKENDS) if device.type == "cuda" else contextlib.nullcontext()


AttentionInterface.register(ATTENTION_NAME, paged_attention)
