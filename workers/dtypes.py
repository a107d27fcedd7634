"""Model dtypes by name, and what "auto" resolves to on a device (kept apart from the runner so
that configs can check a name without importing transformers)."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_dtype(dtype: str, name: str = "dtype", also: tuple[str, ...] = ()) -> None:
    """`dtype` is auto, one of DTYPES or one of `also` (the draft's int8), else ValueError."""
    if dtype != "auto" and dtype not in DTYPES and dtype not in also:
        raise ValueError(f"{name} must be {', '.join(('auto', *DTYPES, *also))}; got {dtype!r}")


def cpu_has_native_bfloat16() -> bool:
    """AVX512-BF16 or AMX on this host's CPU (torch's own probes; private, hence the guards)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(p()) for p in probes if p is not None)


def resolve_dtype(dtype: str, device: torch.device, bfloat16_on_native_cpu: bool = False) -> torch.dtype:
    check_dtype(dtype)
    resolved = DTYPES.get(dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if (bfloat16_on_native_cpu and resolved == torch.float32 and device.type == "cpu"
            and cpu_has_native_bfloat16()):
        return torch.bfloat16
    return resolved


def emulated_bfloat16_note(device: torch.device, dtype: torch.dtype) -> str | None:
    """A one-line warning where a model is to run bfloat16 on a CPU without native bfloat16
    (AVX512-BF16 or AMX), else None: there oneDNN emulates it, and SmolLM2's target ran 1.7-2.9x
    slower than in float32 (BENCHMARKS.md, twenty-seventh session)."""
    if device.type != "cpu" or dtype != torch.bfloat16 or cpu_has_native_bfloat16():
        return None
    return ("bfloat16 on this CPU is emulated (no AVX512-BF16 or AMX): expect it slower than float32 "
            "(--dtype float32, and --draft-dtype auto for the draft)")
