"""Huge pages for torch's CPU allocator: which processes ask for them, and whether this one did.

torch's CPU allocator reads THP_MEM_ALLOC_ENABLE ("1" on, anything else off); with it on,
buffers of 2 MB and up are aligned to 2 MB and madvised as huge pages.
The weights and the KV cache are such buffers, and a forward streams through all of them: a
batch-1 float32 SmolLM2 decode ran 0.86x the time with it (median of 9 paired runs, separate
processes; BENCHMARKS.md, twenty-ninth session). It takes effect where the kernel's transparent
huge pages are `madvise` or `always` (/sys/kernel/mm/transparent_hugepage/enabled).

Torch-free on purpose: the entry points call `ask_for_huge_pages` before anything imports torch.
"""

from __future__ import annotations

import os

ENV = "THP_MEM_ALLOC_ENABLE"


def ask_for_huge_pages() -> None:
    """Turn them on for this process unless the user set the variable (0 keeps them off). Call
    before torch is imported: when torch reads the variable is its own business."""
    os.environ.setdefault(ENV, "1")


def worker_env() -> dict[str, str]:
    """The variable as a worker process gets it (Ray's runtime_env): on, or the user's own value,
    so workers hold huge pages from their start."""
    return {ENV: os.environ.get(ENV, "1")}


def huge_pages_on() -> bool:
    """Whether this process's allocator asks for them (the value torch reads); part of the
    step-time profile's key, since the same step costs less with them."""
    return os.environ.get(ENV) == "1"
