"""The training scripts' precision: bfloat16 autocast only on a CPU that computes it natively."""

import dataclasses

import pytest

from goodspec.training import distill_feature_draft, distill_smollm2
from goodspec.training.precision import resolve_precision
from goodspec.workers.dtypes import cpu_has_native_bfloat16


def test_auto_is_bfloat16_only_where_the_cpu_has_it_and_a_named_dtype_is_kept():
    assert resolve_precision("auto") == ("bfloat16" if cpu_has_native_bfloat16() else "float32")
    assert resolve_precision("bfloat16") == "bfloat16" and resolve_precision("float32") == "float32"
    with pytest.raises(ValueError, match="float16"):
        resolve_precision("float16")


@pytest.mark.parametrize("script", [distill_feature_draft, distill_smollm2])
def test_the_draft_chain_scripts_take_the_same_choice(script, monkeypatch):
    """Both scripts that made the shipped draft resolve --train-precision into the config they
    train and report with (they defaulted to bfloat16: 25x slower training on an AVX2 CPU)."""
    seen = []

    def stop(*args, **kwargs):  # the first thing main() does after building its config
        raise SystemExit(0)

    monkeypatch.setattr(script.torch, "set_num_threads", stop)
    real = script.FeatureDistillConfig if script is distill_feature_draft else script.DistillConfig

    @dataclasses.dataclass(frozen=True)
    class Recorded(real):
        def __post_init__(self):
            seen.append(self)

    monkeypatch.setattr(script, real.__name__, Recorded)
    for given, want in (([], resolve_precision("auto")), (["--train-precision", "bfloat16"], "bfloat16")):
        with pytest.raises(SystemExit) as done:
            script.main(given)
        assert done.value.code == 0  # stopped by `stop`, not by argparse
        assert seen.pop().train_dtype == want
