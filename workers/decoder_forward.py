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
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from goodspec.workers.attention import AttentionMetadata, paged_attention

# Checked against transformers' forward (tests/workers/test_decoder_forward.py); Mistral and
# Qwen2 share the layout but are not tested here, so they keep transformers' forward.
LEAN_MODEL_TYPES = ("llama",)


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
            q = attn.q_proj(x).view(heads).transpose(1, 2)
            k = attn.k_proj(x).view(heads).transpose(1, 2)
            v = attn.v_proj(x).view(heads).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            out, _ = paged_attention(attn, q, k, v, None, scaling=attn.scaling, goodspec_meta=meta)
            hidden = hidden + attn.o_proj(out.reshape(1, num_tokens, -1))
            x = layer.post_attention_layernorm(hidden)
            hidden = hidden + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
            if index in capture:
                captured[index] = hidden
        return decoder.norm(hidden), captured
