"""A Llama decoder's forward over goodspec's packed batch, calling its modules directly.

Why not transformers' `LlamaModel.forward`: this is the same arithmetic, the same modules called
in the same order (outputs equal bit for bit: tests/workers/test_decoder_forward.py), without the
per-forward and per-layer machinery around it (output capturing, deprecated-keyword wrappers,
the attention-interface lookup and keyword plumbing of every layer), which goodspec's packed
forward with its own paged attention does not use. By the two measurements below it costs about
0.03 ms a layer and 0.1 ms a forward here: a batch-1 SmolLM2-135M decode (30 layers, float32) took 17.7-18.0 ms
against 18.5-19.1 through transformers, and a batch-1 pass of its 2-layer draft 0.76-0.81 ms
against 0.97-1.02 (one process, alternating, twenty-first session, BENCHMARKS.md). Calling the
decoder layers themselves (skipping only the model's wrapper) saved nothing: the cost is inside
each layer's call.

Only for model types whose layer layout is Llama's (LEAN_MODEL_TYPES: pre-norm attention and
gated MLP, rotary positions, no extra norms); any other model keeps transformers' forward.

`fuse_projections` joins each layer's query, key and value projections into one linear layer, and
its MLP's gate and up projections into another, as vLLM's QKVParallelLinear and
MergedColumnParallelLinear do: one weight read per group instead of three or two. The runner fuses
where it packs its float32 linears for oneDNN (cpu_linear.py): there the products came out bit
for bit those of the separate layers (SmolLM2's shapes, 18 row counts from 1 to 1024), and a
batch-1 target decode took 0.87x the time, a 4-token verification 0.84x (context 250, the two
runners alternated in one process on an AVX2 CPU; BENCHMARKS.md, twenty-ninth session). A fused
model runs only through LeanDecoder: transformers' forward looks for the separate layers.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from goodspec.workers.attention import AttentionMetadata, paged_attention

# Checked against transformers' forward (tests/workers/test_decoder_forward.py); Mistral and
# Qwen2 share the layout but are not tested here, so they keep transformers' forward.
LEAN_MODEL_TYPES = ("llama",)


def fuse_projections(model: nn.Module) -> int:
    """Replace each decoder layer's q/k/v projections by one `qkv_proj` and its MLP's gate/up
    projections by one `gate_up_proj` (weights concatenated along the output; the split sizes are
    read back from the layers' shapes). Plain `nn.Linear` layers only, before any packing; returns
    how many layers were fused (0 where the model is not one LeanDecoder runs)."""
    if model.config.model_type not in LEAN_MODEL_TYPES:  # LeanDecoder.for_model's rule
        return 0
    fused = 0
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        parts = (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)
        if any(type(p) is not nn.Linear for p in parts):
            continue
        attn.qkv_proj, attn.qkv_sizes = _joined(parts[:3]), [p.out_features for p in parts[:3]]
        mlp.gate_up_proj = _joined(parts[3:])
        del attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj
        fused += 1
    return fused


def _joined(linears: tuple[nn.Linear, ...]) -> nn.Linear:
    """One linear layer computing `linears`' outputs side by side."""
    first = linears[0]
    bias = first.bias is not None
    joined = nn.Linear(first.in_features, sum(p.out_features for p in linears), bias=bias,
                       device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        joined.weight.copy_(torch.cat([p.weight for p in linears]))
        if bias:
            joined.bias.copy_(torch.cat([p.bias for p in linears]))
    return joined.requires_grad_(False)


class LeanDecoder:
    """Runs a causal LM's decoder (`model.model`) over one packed batch `[1, num_tokens]`."""

    def __init__(self, decoder: nn.Module) -> None:
        self.decoder = decoder

    @classmethod
    def for_model(cls, model: nn.Module) -> "LeanDecoder | None":
        """The lean forward of `model`, or None where its type is not one it was checked on."""
        return cls(model.model) if model.config.model_type in LEAN_MODEL_TYPES else None

    def __call__(self, embeds: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 capture: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The final norm's output `[1, num_tokens, d]` for `embeds` `[1, num_tokens, d]` at
        `positions` `[num_tokens]`, and the outputs of the decoder blocks in `capture` (1-based),
        as feature_draft.block_outputs would catch them."""
        decoder = self.decoder
        hidden = embeds
        num_tokens = hidden.shape[1]
        cos, sin = decoder.rotary_emb(hidden, positions.unsqueeze(0))
        captured: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(decoder.layers, start=1):
            attn, mlp = layer.self_attn, layer.mlp
            x = layer.input_layernorm(hidden)
            heads = (1, num_tokens, -1, attn.head_dim)
            if hasattr(attn, "qkv_proj"):  # fuse_projections
                q, k, v = (t.reshape(heads).transpose(1, 2) for t in attn.qkv_proj(x).split(attn.qkv_sizes, -1))
            else:
                q = attn.q_proj(x).view(heads).transpose(1, 2)
                k = attn.k_proj(x).view(heads).transpose(1, 2)
                v = attn.v_proj(x).view(heads).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            out, _ = paged_attention(attn, q, k, v, None, scaling=attn.scaling, goodspec_meta=meta)
            hidden = hidden + attn.o_proj(out.reshape(1, num_tokens, -1))
            x = layer.post_attention_layernorm(hidden)
            if hasattr(mlp, "gate_up_proj"):
                gate, up = mlp.gate_up_proj(x).chunk(2, -1)
            else:
                gate, up = mlp.gate_proj(x), mlp.up_proj(x)
            hidden = hidden + mlp.down_proj(mlp.act_fn(gate) * up)
            if index in capture:
                captured[index] = hidden
        return decoder.norm(hidden), captured
