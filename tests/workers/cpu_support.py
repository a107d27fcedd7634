"""What this host's CPU can run, for tests that must not ask more of it than it has."""

from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def onednn_packs_bfloat16() -> bool:
    """Whether oneDNN packs a bfloat16 weight here: it needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT
    and refuses otherwise ("bf16 path needs the cpu support ..."; seen on an AVX2-only EPYC).
    Every CPU goodspec runs packed bfloat16 on (native bfloat16: AVX512-BF16 or AMX) has it; a
    test that pretends a CPU is native must not run the packed kernel where it is not."""
    from goodspec.workers.cpu_linear import pack_weight

    try:
        pack_weight(torch.zeros(16, 16, dtype=torch.bfloat16))
    except RuntimeError:
        return False
    return True
