"""oneDNN linear layers for float32 inference on a CPU.

torch's float32 `nn.Linear` on a CPU (MKL's sgemm in this build) handles the few-row inputs of
decoding and verification badly: 211 matrices of SmolLM2-135M's shapes took 34 / 57 / 71 / 52 ms
for inputs of 1 / 2 / 3 / 4 rows here, about as if each of 2 or 3 rows read every weight again,
so verifying 2 tokens per sequence cost 1.7x a 1-token decode and more than verifying 4 (batch
1, context 200: 71 / 42 / 60 ms). oneDNN's inner product (`torch.utils.mkldnn.MkldnnLinear`,
torch's own wrapper) took 28 / 29 / 30 / 30 ms for the same matrices; with it, 1 to 6 tokens
per sequence cost 36 to 41 ms, batch 16 and a 500-token prefill run 1.6-1.9x faster, and
logits move by under 1e-4 (BENCHMARKS.md, fourteenth session). It is not used for bfloat16,
where torch's own linear already calls oneDNN and the wrapper's conversions only added time
(23 -> 37 ms a decode), nor off the CPU.

The swap is done on the loaded Hugging Face model rather than by a home-made kernel: the decoder
stays transformers' LlamaModel and only its `nn.Linear` children change class.
"""

from __future__ import annotations

import torch
from torch import nn

CPU_LINEAR_CHOICES = ("onednn", "torch")


def check_cpu_linear(choice: str) -> str:
    """`choice` if it is one of CPU_LINEAR_CHOICES, else ValueError naming them."""
    if choice not in CPU_LINEAR_CHOICES:
        raise ValueError(f"cpu_linear must be {' or '.join(CPU_LINEAR_CHOICES)}; got {choice!r}")
    return choice


def add_cpu_linear_flag(parser) -> None:
    """`--cpu-linear`, for the tools that take it outside EngineConfig's own flags (`goodspec
    profile`, goodspec.closed_batch): one declaration, one help text."""
    parser.add_argument("--cpu-linear", default="onednn", choices=CPU_LINEAR_CHOICES,
                        help="float32 on a CPU: oneDNN linear layers or torch's own")


def uses_onednn(choice: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `choice` ("onednn" | "torch") swaps the linears of a model on `device` in `dtype`."""
    return (check_cpu_linear(choice) == "onednn" and device.type == "cpu" and dtype == torch.float32
            and torch.backends.mkldnn.is_available())


def to_onednn_linears(model: nn.Module) -> int:
    """Replace every `nn.Linear` under `model` with a oneDNN one holding a copy of its weight
    (a tied output layer gets its own copy; the embedding it shares keeps the original).
    Inference only: the new layers have no gradients. Returns how many were replaced."""
    from torch.utils.mkldnn import MkldnnLinear

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, MkldnnLinear(child, child.weight.dtype))
                swapped += 1
    return swapped
