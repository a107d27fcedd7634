"""Batched attention over the paged KV cache, plugged into transformers' AttentionInterface.

The model runs one packed batch: every sequence's new tokens are laid end to end as a batch of
one, `[1, num_tokens]`, with explicit position ids, so a 300-token prompt chunk, a 1-token decode
and a 6-token verification share one forward without padding the MLPs. Attention is the only
place sequences must be told apart: each layer writes its new K/V into the cache slots of its
sequence, gathers each sequence's whole context through its block table, and runs SDPA on a
`[num_seqs, max_new, max_context]` causal mask (in bfloat16 on a CPU, two grouped matmuls
instead: see `_grouped_matmul_attention`); a batch mixing prompt chunks with decodes runs as two
such groups, so decodes are not padded to a chunk's length (`query_groups`). Everything here is
tensor ops prepared once per forward (`AttentionMetadata`) and reused by every layer.
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
class AttentionGroup:
    """Sequences whose queries are padded together: `[num_seqs, max_new, max_context]` of their own."""

    block_tables: torch.Tensor  # [num_seqs, max_blocks] (the group's own longest context)
    pad_index: torch.Tensor  # [num_seqs, max_new] packed index of each padded query (num_tokens = pad)
    unpad_index: torch.Tensor  # [group tokens] index into the flattened [num_seqs * max_new]
    token_index: torch.Tensor | None  # [group tokens] their packed indices; None: every token, in order
    mask: torch.Tensor  # [num_seqs, 1, max_new, max_context] True where attention is allowed
    # Every sequence of the batch, each with the same number of new tokens: the padded queries are
    # the packed ones in order (pad_index and unpad_index count up), so attention skips both gathers.
    unpadded: bool = False


@dataclass
class AttentionMetadata:
    cache: PagedKVCache
    slot_mapping: torch.Tensor  # [num_tokens] flat cache slot of each new token
    groups: list[AttentionGroup]  # one, or two when a batch mixes prompt chunks with decodes

    @classmethod
    def build(
        cls, cache: PagedKVCache, seq_ids: list[str], starts: list[int], num_new: list[int],
        device: torch.device,
    ) -> tuple["AttentionMetadata", torch.Tensor]:
        """Metadata for one packed forward, and the packed position ids `[num_tokens]`.
        The sequences must already be sized in the cache (`PagedKVCache.prepare`)."""
        build = cls.uniform if min(num_new) == max(num_new) else cls.packed
        return build(cache, [cache.block_table(s) for s in seq_ids], starts, num_new, device)

    @classmethod
    def packed(cls, cache: PagedKVCache, tables: list[list[int]], starts: list[int], num_new: list[int],
               device: torch.device) -> tuple["AttentionMetadata", torch.Tensor]:
        """`build` for any batch, from each sequence's block table."""
        bs = cache.spec.block_size
        num_seqs = len(tables)
        block_tables = _padded(tables)
        blocks = torch.tensor([len(t) for t in tables], dtype=torch.long)
        q_lens = torch.tensor(num_new, dtype=torch.long)
        start_t = torch.tensor(starts, dtype=torch.long)
        total = int(q_lens.sum())
        seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), q_lens)  # [num_tokens]
        cu = torch.cumsum(q_lens, 0) - q_lens  # first packed index of each sequence
        offset = torch.arange(total) - cu[seq_of_token]  # index within the sequence's new tokens
        positions = start_t[seq_of_token] + offset
        slot_mapping = block_tables[seq_of_token, positions // bs] * bs + positions % bs
        groups = [_group(torch.tensor(members, dtype=torch.long), block_tables, blocks, q_lens, start_t, cu,
                         total, bs, device)
                  for members in query_groups(num_new)]
        meta = cls(cache=cache, slot_mapping=slot_mapping.to(device), groups=groups)
        return meta, positions.to(device)

    @classmethod
    def uniform(cls, cache: PagedKVCache, tables: list[list[int]], starts: list[int], num_new: list[int],
                device: torch.device) -> tuple["AttentionMetadata", torch.Tensor]:
        """`build` where every sequence appends the same number of tokens (a draft's passes, plain
        decodes, one request's verification or prompt, fixed:k verifications): what `packed`
        gives, from fewer small tensor ops (27 us against 90 at batch 1 here, where 90 was a
        tenth of a draft pass), marked so attention skips its padding gathers."""
        n = num_new[0]
        if any(m != n for m in num_new):
            raise ValueError(f"uniform takes the same number of new tokens a sequence; got {num_new}")
        bs = cache.spec.block_size
        block_tables = _padded(tables)
        pos = torch.tensor(starts, dtype=torch.long)[:, None] + torch.arange(n)  # [num_seqs, n]
        slot_mapping = (block_tables.gather(1, pos // bs) * bs + pos % bs).view(-1)
        index = torch.arange(pos.numel(), device=device)
        mask = (torch.arange(block_tables.shape[1] * bs) <= pos[:, :, None]).unsqueeze(1)
        group = AttentionGroup(block_tables=block_tables.to(device), pad_index=index.view(pos.shape),
                               unpad_index=index, token_index=None, mask=mask.to(device), unpadded=True)
        return cls(cache=cache, slot_mapping=slot_mapping.to(device), groups=[group]), pos.view(-1).to(device)


def _padded(tables: list[list[int]]) -> torch.Tensor:
    """Block tables as one `[num_seqs, longest]` tensor, short ones padded with block 0."""
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)


def query_groups(num_new: list[int]) -> list[list[int]]:
    """The sequences (indices) to pad together. Attention pads every query of a group to its
    longest, so one 300-token prompt chunk beside 30 one-token decodes made 31 x 300 query rows
    against every context: mixed steps of the real pair took 2-3.7 s in bfloat16 on this CPU where
    the same 512 tokens of prompt alone took 0.3 (goodspec.closed_batch, 32 chat requests). The
    batch is split in two by query length where that at least halves the padded query rows."""
    n = len(num_new)
    order = sorted(range(n), key=lambda i: num_new[i])
    lens = [num_new[i] for i in order]
    whole = n * lens[-1]
    best, cut = whole, n
    for i in range(1, n):  # the i shortest together, the rest together
        padded = i * lens[i - 1] + (n - i) * lens[-1]
        if padded < best:
            best, cut = padded, i
    if 2 * best > whole:
        return [list(range(n))]
    return [sorted(order[:cut]), sorted(order[cut:])]


def _group(idx: torch.Tensor, all_tables: torch.Tensor, blocks: torch.Tensor, q_lens: torch.Tensor,
           start_t: torch.Tensor, cu: torch.Tensor, total: int, bs: int, device: torch.device) -> AttentionGroup:
    """The group of sequences `idx`; `all_tables`, `blocks`, `q_lens`, `start_t`, `cu`: every
    sequence's block table, its length in blocks, its new tokens, its start and first packed index.
    A group of every sequence keeps the packed order, so it needs no token_index."""
    lens, starts, firsts = q_lens[idx], start_t[idx], cu[idx]
    max_blocks = int(blocks[idx].max())
    block_tables = all_tables[idx, :max_blocks]
    max_new = int(lens.max())
    j = torch.arange(max_new)
    valid = j[None, :] < lens[:, None]  # [num_seqs, max_new]
    pad_index = torch.where(valid, firsts[:, None] + j[None, :], torch.full_like(valid, total, dtype=torch.long))
    local = torch.repeat_interleave(torch.arange(len(idx)), lens)
    within = torch.arange(int(lens.sum())) - (torch.cumsum(lens, 0) - lens)[local]
    unpad_index = local * max_new + within
    whole = len(idx) == all_tables.shape[0]
    # A padded query row attends like the sequence's last real query, so no row is all-masked.
    q_pos = starts[:, None] + torch.minimum(j[None, :], (lens - 1)[:, None])
    key_pos = torch.arange(max_blocks * bs)
    mask = (key_pos[None, None, :] <= q_pos[:, :, None]).unsqueeze(1)
    return AttentionGroup(
        block_tables=block_tables.to(device),
        pad_index=pad_index.to(device),
        unpad_index=unpad_index.to(device),
        token_index=None if whole else (firsts[local] + within).to(device),
        mask=mask.to(device),
    )


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
    num_kv_heads = key.shape[1]
    k_layer, v_layer = cache.k[layer], cache.v[layer]  # [num_blocks, block_size, kv_heads, head_dim]
    k_layer.view(-1, num_kv_heads, key.shape[3])[meta.slot_mapping] = key[0].transpose(0, 1)
    v_layer.view(-1, num_kv_heads, key.shape[3])[meta.slot_mapping] = value[0].transpose(0, 1)
    q = query[0].transpose(0, 1)  # [num_tokens, heads, head_dim]
    if meta.groups[0].unpadded:  # the packed queries are the padded ones: no zero row, no gathers
        return _group_attention(q, k_layer, v_layer, meta.groups[0], scaling).unsqueeze(0), None
    q = torch.cat([q, q.new_zeros(1, *q.shape[1:])])  # a zero row for padded queries
    if len(meta.groups) == 1:  # every sequence, in packed order
        out = _group_attention(q, k_layer, v_layer, meta.groups[0], scaling)
    else:
        out = q.new_empty(q.shape[0] - 1, *q.shape[1:])
        for group in meta.groups:
            out[group.token_index] = _group_attention(q, k_layer, v_layer, group, scaling)
    return out.unsqueeze(0), None  # [1, num_tokens, heads, head_dim]


def _group_attention(q: torch.Tensor, k_layer: torch.Tensor, v_layer: torch.Tensor, g: AttentionGroup,
                     scaling: float | None) -> torch.Tensor:
    """Attention of one group's queries (`q`: every packed query and a zero row) over their
    contexts: `[group tokens, heads, head_dim]`, in the group's token order."""
    num_seqs = g.block_tables.shape[0]
    num_kv_heads, head_dim = k_layer.shape[2], k_layer.shape[3]
    # [num_seqs, kv_heads, max_context, head_dim]. index_select on the flattened table, not
    # k_layer[block_tables]: the same gather, 2.5-5x faster on a CPU (4096 blocks of 16 x 3 x 64
    # floats, 16 blocks a sequence: 10 us against 45 at batch 1, 82 against 314 at 16), and a
    # forward of the SmolLM2 target gathers twice a layer, 60 times.
    blocks = g.block_tables.reshape(-1)
    k_ctx = k_layer.index_select(0, blocks).view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    v_ctx = v_layer.index_select(0, blocks).view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    # [num_seqs, max_new, heads, hd]
    qg = q.reshape(*g.pad_index.shape, *q.shape[1:]).contiguous() if g.unpadded else q[g.pad_index]
    gqa = qg.shape[2] != num_kv_heads
    if gqa and qg.is_cuda:  # the memory-efficient kernel takes no enable_gqa: give it every head
        k_ctx = k_ctx.repeat_interleave(qg.shape[2] // num_kv_heads, dim=1)
        v_ctx = v_ctx.repeat_interleave(qg.shape[2] // num_kv_heads, dim=1)
        gqa = False
    if qg.device.type == "cpu" and qg.dtype == torch.bfloat16:
        out = _grouped_matmul_attention(qg.transpose(1, 2), k_ctx, v_ctx, g.mask, scaling)
    else:
        out = F.scaled_dot_product_attention(
            qg.transpose(1, 2), k_ctx, v_ctx, attn_mask=g.mask, scale=scaling, enable_gqa=gqa,
        )  # [num_seqs, heads, max_new, head_dim]
    out = out.transpose(1, 2).reshape(-1, out.shape[1], head_dim)
    return out if g.unpadded else out[g.unpad_index]


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
