"""The training scripts' precision choice: bfloat16 autocast only where the CPU computes it.

Measured on an AVX2-only EPYC (no native bfloat16), the one-run recipe's 2-step test run
(goodspec.training.train_smollm2_draft): training 89 s under bfloat16 autocast against 3.6 s in
float32, 25x, the backward pass emulating bfloat16; on the AVX-512 machine the recipes were sized
on, bfloat16 was the faster."""

from __future__ import annotations

import torch

from goodspec.workers.dtypes import resolve_dtype

PRECISIONS = ("auto", "bfloat16", "float32")
PRECISION_HELP = ("auto: bfloat16 where the CPU has it natively (AVX512-BF16 or AMX), else float32 "
                  "(emulated bfloat16 trained 25x slower on an AVX2-only CPU)")


def resolve_precision(precision: str) -> str:
    """"auto": bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX), else float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "auto":  # the model runner's own rule for a CPU (bfloat16_on_native_cpu)
        return str(resolve_dtype("auto", torch.device("cpu"), bfloat16_on_native_cpu=True)).removeprefix("torch.")
    return precision
