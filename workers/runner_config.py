"""RunnerConfig: what one ModelRunner loads and how. A module of its own so that goodspec.config
builds the target's and the draft's configs without importing the runner and its model code."""

from __future__ import annotations

from dataclasses import dataclass

from goodspec.workers.cpu_linear import check_cpu_linear
from goodspec.workers.int8_linear import INT8_WEIGHTS


@dataclass(frozen=True)
class RunnerConfig:
    model_dir: str
    device: str = "auto"  # "auto" = cuda when present, else cpu
    dtype: str = "auto"  # "auto" = float32 on cpu, bfloat16 on cuda
    kv_cache_tokens: int = 65536  # the KV budget, in tokens across all sequences
    block_size: int = 16
    threads: int = 0  # CPU threads for torch; 0 = torch's default on a CPU, 1 on a GPU
    cpu_linear: str = "onednn"  # float32 on a CPU: oneDNN linears (see cpu_linear.py) | torch
    # Where float32 would run on a CPU with native bfloat16 (AVX512-BF16 or AMX), run bfloat16:
    # the draft's dtype "auto" (EngineConfig.draft_dtype). Its weights, read whole by every
    # batch-1 pass, take half the bytes: a batch-1 SmolLM2 draft pass took 3.0 ms in bfloat16
    # against 4.2 in float32 here (BENCHMARKS.md, sixteenth session).
    bfloat16_on_native_cpu: bool = False
    # A draft's linear layers with int8 weights for few-row inputs (int8_linear.py): on (the
    # draft dtype "int8"; a CPU and dtype bfloat16 or float32 only) | auto (the draft's dtype
    # "auto": where the runner runs float32 on a CPU, or bfloat16 on one with native bfloat16)
    # | off.
    int8_weights: str = "off"

    def __post_init__(self) -> None:
        if self.kv_cache_tokens < self.block_size:
            raise ValueError(
                f"kv_cache_tokens must be >= block_size ({self.block_size}); got {self.kv_cache_tokens}"
            )
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1; got {self.block_size}")
        check_cpu_linear(self.cpu_linear)
        if self.int8_weights not in INT8_WEIGHTS:
            raise ValueError(f"int8_weights must be {', '.join(INT8_WEIGHTS)}; got {self.int8_weights!r}")
        if self.int8_weights == "on" and self.dtype not in ("bfloat16", "float32"):
            raise ValueError(f"int8 weights run in a bfloat16 or float32 model; got dtype {self.dtype!r}")
