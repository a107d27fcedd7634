"""Packed oneDNN linear layers for inference on a CPU (float32, and bfloat16 where the CPU has it).

torch's float32 `nn.Linear` on a CPU (MKL's sgemm in this build) handles the few-row inputs of
decoding and verification badly: 211 matrices of SmolLM2-135M's shapes took 34 / 57 / 71 / 52 ms
for inputs of 1 / 2 / 3 / 4 rows here, about as if each of 2 or 3 rows read every weight again
(BENCHMARKS.md, fourteenth session). oneDNN's inner product does not, and with its weight
reordered once into oneDNN's blocked layout (`PackedOneDNNLinear`) a batch-1 decode of the
target took 18 ms against 31 with torch's public oneDNN wrapper and 36 with MKL, a 4-token
verification 20 against 39 and 56, batch 16 38 against 60 and 81 (nineteenth session). In
bfloat16 torch's own linear already calls oneDNN, but on an unpacked weight: packed, the same
products come out bit for bit and a batch-1 pass of the SmolLM2 draft took 1.85 against 2.5 ms.

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
                        help="on a CPU: packed oneDNN linear layers (float32, native bfloat16) or torch's own")


def uses_onednn(choice: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `choice` ("onednn" | "torch") swaps the linears of a model on `device` in `dtype`:
    float32 on a CPU with oneDNN, bfloat16 where that CPU also has native bfloat16 (AVX512-BF16
    or AMX; elsewhere oneDNN emulates it, not measured)."""
    from goodspec.workers.dtypes import cpu_has_native_bfloat16

    if check_cpu_linear(choice) != "onednn" or device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_has_native_bfloat16())


# The batch size oneDNN lays a packed weight out for; any number of rows is accepted. 16 and 4
# ran alike for 1 to 256 rows of SmolLM2's shapes, 1 was up to 2.5x slower (BENCHMARKS.md,
# nineteenth session).
PACK_BATCH_HINT = 16


class PackedOneDNNLinear(nn.Module):
    """A linear layer (float32 or bfloat16) whose weight oneDNN has reordered once into its own
    blocked layout. Inference only.

    Why not `torch.utils.mkldnn.MkldnnLinear`, torch's public wrapper: it keeps the weight in
    oneDNN's plain layout and converts every input to a oneDNN tensor and back, so a 576 -> 1536
    layer took about twice as long for 2 rows as the packed one (thirty such layers in turn:
    4.5-4.8 against 1.7-2.3 ms) and 1.5x as long for 1 row (3.2 against 1.6-2.3). These are the
    two ops torch's own compiler (inductor's weight-prepacking pass) emits for the same purpose,
    called here without compiling the model, whose shapes (rows, context) change every step."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed_weight", pack_weight(weight))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed_weight, self.bias)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` ([out, in], float32 or bfloat16) in oneDNN's blocked layout, for packed_linear."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ bias) with W packed by pack_weight; x of any leading shape, W's dtype."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def swap_linears(model: nn.Module, make) -> int:
    """Replace every `nn.Linear` under `model` with `make(linear)`; returns how many were replaced."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, make(child))
                swapped += 1
    return swapped


def to_onednn_linears(model: nn.Module) -> int:
    """Replace every `nn.Linear` under `model` with a packed oneDNN one holding a copy of its
    weight (a tied output layer gets its own copy; the embedding it shares keeps the original).
    Inference only: the new layers have no gradients. Returns how many were replaced."""
    return swap_linears(model, PackedOneDNNLinear)
