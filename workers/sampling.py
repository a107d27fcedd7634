"""Sampling parameters, logits -> probabilities, and reproducible per-request randomness.

Randomness is counter-based: the uniform used to draw a request's token at position `pos` is a
hash of (seed, pos, stream). It does not depend on batching, on which other requests share the
step, on preemption or on a worker restart, so a seeded request always gives the same output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Streams: independent uniforms for the three random draws that can touch one position.
STREAM_DRAFT, STREAM_ACCEPT, STREAM_TARGET = 0, 1, 2
_MASK32 = 0xFFFFFFFF
MIN_TEMPERATURE = 1e-4  # below this a temperature is treated as 0 (greedy)


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 mean no truncation."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {self.max_new_tokens}")
        if not 0 <= self.temperature < math.inf:  # also refuses nan
            raise ValueError(f"temperature must be a finite number >= 0; got {self.temperature}")
        if self.temperature < MIN_TEMPERATURE:
            # logits / t overflows for tiny t (below ~1e-37 every logit became inf and the
            # output one fixed token); t -> 0 is greedy decoding, so that is what it means.
            object.__setattr__(self, "temperature", 0.0)
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off); got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63); got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on int64 tensors holding 32-bit values."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x21F0AAAD) & _MASK32
    x = ((x ^ (x >> 15)) * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def hash_uniform(seeds: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """Uniform floats in [0, 1) from (seed, position, stream); broadcasting int64 tensors."""
    h = _mix32(seeds ^ (stream * 0x9E3779B9))
    h = _mix32(h ^ (seeds >> 32))
    h = _mix32(h ^ positions)
    lo = _mix32(h ^ 0x5BD1E995)  # a second word for 48 bits of resolution
    return ((h >> 8) * (1 << 24) + (lo >> 8)).double().div_(float(1 << 48)).float()


def logits_to_probs(
    logits: torch.Tensor,  # [..., vocab] float
    temperature: torch.Tensor,  # [...] (0 rows are greedy: returned as one-hot argmax)
    top_k: torch.Tensor,  # [...] int, 0 = off
    top_p: torch.Tensor,  # [...] float, 1 = off
) -> torch.Tensor:
    """Temperature, then top-k, then top-p, exactly as applied to both draft and target."""
    logits = logits.float()
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, 1.0, temperature).unsqueeze(-1)
    vocab = logits.shape[-1]
    if bool(((top_k > 0) & (top_k < vocab)).any()) or bool((top_p < 1).any()):
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=logits.device)
        k = torch.where(top_k > 0, top_k, vocab).unsqueeze(-1)
        drop = rank >= k
        sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop |= mass_before >= top_p.unsqueeze(-1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.empty_like(scaled).scatter_(-1, order, sorted_logits)
    probs = torch.softmax(scaled, dim=-1)
    if bool(greedy.any()):
        one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy.unsqueeze(-1), one_hot, probs)
    return probs


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: one uniform per row gives one token per row. [..., V], [...] -> [...]"""
    cdf = probs.cumsum(-1)
    target = uniforms.unsqueeze(-1) * cdf[..., -1:]
    idx = torch.searchsorted(cdf, target.contiguous(), right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)
