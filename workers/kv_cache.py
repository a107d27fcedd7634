"""Paged KV cache: a fixed pool of blocks shared by all sequences of one model.

One tensor per K and V holds every layer: `[num_layers, num_blocks, block_size, num_kv_heads,
head_dim]`. A sequence owns a list of blocks (its block table) and a length; growing it takes
blocks from the free list, truncating it (rejected draft tokens) gives whole blocks back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCacheFullError(RuntimeError):
    """The KV budget cannot hold what was asked; nothing was changed."""


class UnknownSequenceError(KeyError):
    """The worker holds no (or too little) cache for a sequence the caller expected it to have,
    e.g. after the worker restarted. The caller must re-prefill it from position 0."""


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int = 16

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


class PagedKVCache:
    def __init__(self, spec: KVCacheSpec, dtype: torch.dtype, device: torch.device | str) -> None:
        if spec.num_blocks < 1 or spec.block_size < 1:
            raise ValueError(f"KV cache needs >= 1 block of >= 1 token; got {spec}")
        self.spec = spec
        shape = (spec.num_layers, spec.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # Pop from the end: recently freed blocks are reused first (warm in cache).
        self._free: list[int] = list(range(spec.num_blocks - 1, -1, -1))
        self._tables: dict[str, list[int]] = {}
        self._lengths: dict[str, int] = {}

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.spec.num_blocks - len(self._free)

    def length(self, seq_id: str) -> int:
        return self._lengths.get(seq_id, 0)

    def block_table(self, seq_id: str) -> list[int]:
        return self._tables[seq_id]

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def seq_ids(self) -> list[str]:
        return list(self._tables)

    # -- mutation ------------------------------------------------------------------------------
    def prepare(self, spans: list[tuple[str, int, int]]) -> None:
        """For each (seq_id, start_pos, num_new_tokens): roll the sequence back to start_pos and
        grow it to start_pos + num_new_tokens. All or nothing: when the new blocks do not fit,
        raise KVCacheFullError with every sequence unchanged."""
        needed = 0
        for seq_id, start, num_new in spans:
            have = self._lengths.get(seq_id)
            if have is None and start > 0 or have is not None and start > have:
                raise UnknownSequenceError(
                    f"sequence {seq_id!r} has {have or 0} cached tokens; asked to continue at {start}"
                )
            held = len(self._tables.get(seq_id, ()))
            needed += max(0, self.spec.blocks_for(start + num_new) - held)
        if needed > len(self._free):
            raise KVCacheFullError(
                f"KV cache full: this batch needs {needed} more blocks of {self.spec.block_size} "
                f"tokens but only {len(self._free)} of {self.spec.num_blocks} are free"
            )
        for seq_id, start, num_new in spans:
            self.truncate(seq_id, start)
            table = self._tables[seq_id]
            want = self.spec.blocks_for(start + num_new)
            while len(table) < want:
                table.append(self._free.pop())
            self._lengths[seq_id] = start + num_new

    def truncate(self, seq_id: str, length: int) -> None:
        """Keep the first `length` tokens of a sequence (creating it empty if new)."""
        table = self._tables.setdefault(seq_id, [])
        have = self._lengths.get(seq_id, 0)
        if length > have:
            raise UnknownSequenceError(f"cannot truncate {seq_id!r} to {length}: it holds {have}")
        keep = self.spec.blocks_for(length)
        while len(table) > keep:
            self._free.append(table.pop())
        self._lengths[seq_id] = length

    def free(self, seq_id: str) -> None:
        table = self._tables.pop(seq_id, None)
        self._lengths.pop(seq_id, None)
        if table:
            self._free.extend(reversed(table))
