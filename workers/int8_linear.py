"""int8 weights for a draft's linear layers on a CPU (in a bfloat16 or a float32 draft).

A batch-1 draft pass is mostly its linear layers reading their weights: of a 2.47 ms bfloat16 pass
of the shipped SmolLM2 draft (one thread, context 200), 1.65 ms was `aten::mm` (torch.profiler,
BENCHMARKS.md, eighteenth session). Stored as int8 with one bfloat16 scale per output row, the
weights take half the bytes again, and torch's `_weight_int8pack_mm` CPU kernel multiplies them
without materialising a bfloat16 copy: 28 us against 65 us for a 576 -> 1536 layer at one row.
That kernel's time grows with every row, so inputs of more than INT8_MAX_ROWS rows (batched
decodes, a prompt) keep to the bfloat16 weight, packed by oneDNN where the runner packs its
linears (cpu_linear.py): never slower than bfloat16, faster at batch <= 4.

On a CPU without native bfloat16 (AVX2 only) the draft runs float32, and its few-row inputs are
rounded to bfloat16 for the same kernel (which multiplies float32 rows ~13x slower than bfloat16
ones there) and the product returned in float32; larger inputs keep to the float32 weight. A
batch-1 pass of the SmolLM2 draft took 5.5 ms against 7.4 in float32 there, 9.8 against 10.8 at
batch 4, the same from batch 8 on; bfloat16 itself, emulated, took 36 ms at batch 8 against 16
(BENCHMARKS.md, twenty-eighth session).

Only for the draft: the draft only proposes, and rejection sampling takes its q as given, so
output stays the target's; the target's own weights are never quantised. Only the draft's decoder
and output layer: a feature draft's input layer reads the target's hidden states, whose outlier
dimensions multiply its rounding error; int8 there cost acceptance on the chat bench's prompts
(fixed:1 0.547 against 0.599 in bfloat16), and kept in bfloat16 it is 0.603 (ModelRunner).

Why not a library: torchao 0.18's `Int8WeightOnlyConfig` ran that layer in 164 us here (its
tensor subclass dispatches per call; its fast path needs torch.compile), and
`torch.ao.quantization.quantize_dynamic` (fbgemm, about as fast) is deprecated, with removal
announced in its own warnings, and quantises the activations too. `_weight_int8pack_mm` is the
kernel both gpt-fast and torchao's compiled path call on a CPU; the swap below keeps
transformers' decoder and changes only the class of its `nn.Linear` children, as cpu_linear does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from goodspec.workers.cpu_linear import pack_weight, packed_linear, swap_linears

INT8 = "int8"  # the draft dtype name (EngineConfig.draft_dtype) that selects these layers
# Inputs of at most this many rows take the int8 kernel, larger ones the bfloat16 weight: the
# int8 kernel's time grows with every row, oneDNN's bfloat16 one barely does until 8. One thread,
# us per call, bfloat16 / int8 (BENCHMARKS.md, eighteenth session):
#   576 -> 1536:  1 row 65 / 28, 4 rows 67 / 60, 6 rows 79 / 87, 16 rows 107 / 194
#   576 -> 8192:  1 row 266 / 122, 4 rows 275 / 245, 6 rows 307 / 400, 16 rows 493 / 965
INT8_MAX_ROWS = 4


class Int8WeightLinear(nn.Module):
    """y = x W^T (+ b) in the layer's dtype (bfloat16 or float32). Inputs of at most
    INT8_MAX_ROWS rows, rounded to bfloat16, multiply W stored as int8 rows with a bfloat16 scale
    per row (symmetric, round to nearest: |W - scale * W_int8| <= scale / 2 elementwise); larger
    ones the layer's own W, kept beside it (a draft's weights are small: 12.5 M parameters take
    25 MB in bfloat16, 50 in float32, and 12.5 MB more in int8). Inference only. With `packed`,
    that W is kept in oneDNN's blocked layout (cpu_linear.PackedOneDNNLinear: the same
    products, faster)."""

    def __init__(self, linear: nn.Linear, packed: bool = False) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scales = w.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()  # the model's dtype: bfloat16, or float32
        self.packed = packed
        self.register_buffer("weight", pack_weight(weight) if packed else weight)
        self.register_buffer("weight_int8", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > INT8_MAX_ROWS * self.in_features:
            return packed_linear(x, self.weight, self.bias) if self.packed else F.linear(x, self.weight, self.bias)
        # The kernel takes bfloat16 rows (a no-op in a bfloat16 draft; float32 rows it multiplies
        # ~13x slower than bfloat16 ones here) and returns its product in their dtype.
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16), self.weight_int8,
                                      self.scales).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


INT8_WEIGHTS = ("off", "on", "auto")  # RunnerConfig.int8_weights


def uses_int8(choice: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a runner on `device` in `dtype` swaps its linears: "on" (ValueError off a CPU),
    "auto" (the draft's dtype "auto") on a CPU where it runs bfloat16 natively (AVX512-BF16 or
    AMX) or float32 (a CPU without native bfloat16: there a batch-1 pass of the SmolLM2 draft
    took 5.5 ms against 7.4, batch 4 9.8 against 10.8, from batch 8 on the same), "off" never."""
    from goodspec.workers.dtypes import cpu_has_native_bfloat16

    if choice not in INT8_WEIGHTS:
        raise ValueError(f"int8_weights must be {', '.join(INT8_WEIGHTS)}; got {choice!r}")
    if choice == "on" and device.type != "cpu":
        raise ValueError(f"int8 draft weights run on a CPU only; this runner is on {device}")
    if choice == "auto":
        return device.type == "cpu" and (dtype == torch.float32
                                          or dtype == torch.bfloat16 and cpu_has_native_bfloat16())
    return choice == "on"


def to_int8_linears(model: nn.Module, packed: bool = False) -> int:
    """Replace every `nn.Linear` under `model` (a bfloat16 model on a CPU) with an
    Int8WeightLinear built from its weight (`packed`: its bfloat16 copy packed by oneDNN); a
    tied output layer gets its own int8 copy and the embedding keeps the original. Returns how
    many were replaced."""
    if not hasattr(torch, "_weight_int8pack_mm"):
        raise RuntimeError(f"torch {torch.__version__} has no _weight_int8pack_mm: use another draft dtype")
    return swap_linears(model, lambda linear: Int8WeightLinear(linear, packed))
