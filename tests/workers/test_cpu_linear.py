"""oneDNN linears on a CPU: the same logits as torch's own, every linear swapped, and only where
they are meant to be used."""

import pytest
import torch
from torch import nn

from goodspec.config import DEFAULT_DRAFT, DEFAULT_TARGET, SMOLLM2_DRAFT, EngineConfig
from goodspec.workers import dtypes
from goodspec.workers.cpu_linear import uses_onednn
from goodspec.workers.model_runner import ModelRunner, RunnerConfig
from tests.workers.cpu_support import onednn_packs_bfloat16


def _runner(model_dir: str, cpu_linear: str) -> ModelRunner:
    return ModelRunner(RunnerConfig(model_dir, device="cpu", dtype="float32", kv_cache_tokens=512,
                                    cpu_linear=cpu_linear))


def _prefill_then_verify(runner: ModelRunner) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences' prompts, then a 4-token verification span and a 1-token decode."""
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randint(3, 4000, (n,), generator=g).tolist() for n in (37, 12))
    first = runner.forward(["a", "b"], [0, 0], [a[:33], b[:11]], [2, 1])
    second = runner.forward(["a", "b"], [33, 11], [a[33:], b[11:]], [4, 1])
    runner.free(["a", "b"])
    return first, second


@pytest.mark.parametrize("model_dir", [DEFAULT_TARGET, DEFAULT_DRAFT], ids=["target", "draft"])
def test_onednn_linears_give_torchs_logits(model_dir):
    plain, onednn = _runner(model_dir, "torch"), _runner(model_dir, "onednn")
    linears = sum(type(m) is nn.Linear for m in plain.model.modules())
    assert plain.onednn_linears == 0
    # each layer's q/k/v and gate/up joined into two (decoder_forward.fuse_projections)
    assert onednn.fused_layers == plain.model.config.num_hidden_layers and plain.fused_layers == 0
    assert onednn.onednn_linears == linears - 3 * onednn.fused_layers > 0
    assert not any(type(m) is nn.Linear for m in onednn.model.modules())
    for want, got in zip(_prefill_then_verify(plain), _prefill_then_verify(onednn)):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("model_dir", [DEFAULT_DRAFT, SMOLLM2_DRAFT], ids=["tiny", "smollm2"])
def test_packed_bfloat16_linears_give_torchs_logits_bit_for_bit(model_dir):
    if not uses_onednn("onednn", torch.device("cpu"), torch.bfloat16):
        pytest.skip("this CPU has no native bfloat16: its linears are not packed")
    plain, packed = (ModelRunner(RunnerConfig(model_dir, device="cpu", dtype="bfloat16", kv_cache_tokens=512,
                                              cpu_linear=c)) for c in ("torch", "onednn"))
    modules = [*plain.model.modules(), *(plain.feature_input.modules() if plain.feature_input is not None else ())]
    assert packed.onednn_linears == sum(type(m) is nn.Linear for m in modules) > 0  # a feature layer's too
    for want, got in zip(_prefill_then_verify(plain), _prefill_then_verify(packed)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("native", [True, False])
def test_onednn_only_on_a_cpu_in_float32_or_native_bfloat16(monkeypatch, native):
    monkeypatch.setattr(dtypes, "cpu_has_native_bfloat16", lambda: native)  # the host's CPU is fixed
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    onednn = torch.backends.mkldnn.is_available()
    assert uses_onednn("onednn", cpu, torch.float32) == onednn
    assert uses_onednn("onednn", cpu, torch.bfloat16) == (onednn and native)  # emulated elsewhere
    assert not uses_onednn("onednn", cpu, torch.float16)
    assert not uses_onednn("onednn", cuda, torch.float32)
    assert not uses_onednn("torch", cpu, torch.float32)
    if native and not onednn_packs_bfloat16():
        pytest.skip("this CPU cannot run oneDNN's packed bfloat16 kernel (no AVX-512)")
    bf16 = ModelRunner(RunnerConfig(DEFAULT_DRAFT, device="cpu", dtype="bfloat16", kv_cache_tokens=64))
    assert (bf16.onednn_linears > 0) == (onednn and native)


def test_unknown_cpu_linear_is_refused_at_the_edge():
    with pytest.raises(ValueError, match="cpu_linear must be"):
        uses_onednn("mkl", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="cpu_linear must be"):
        RunnerConfig(DEFAULT_TARGET, cpu_linear="mkl")
    with pytest.raises(ValueError, match="cpu_linear must be onednn or torch"):
        EngineConfig(target_dir=DEFAULT_TARGET, draft_dir=DEFAULT_DRAFT, cpu_linear="mkl")


def test_step_time_profiles_are_cached_per_cpu_linear_where_it_applies(monkeypatch):
    """The goodput model is seeded from a cached profiling sweep: one measured with torch's
    linears must not seed an engine running oneDNN's (they differ by up to 2x); where
    cpu_linear changes nothing (float16 here), both share one profile."""
    import goodspec.scheduler.profiler as profiler
    from goodspec.engine import LLMEngine

    keys = []
    monkeypatch.setattr(profiler, "warm_up_goodput", lambda _sched, _tokens, key: keys.append(key))
    for dtype in ("float32", "float16"):
        for choice in ("onednn", "torch"):
            LLMEngine(EngineConfig(target_dir=DEFAULT_TARGET, draft_dir=DEFAULT_DRAFT, policy="goodput",
                                   device="cpu", dtype=dtype, draft_dtype=dtype, cpu_linear=choice,
                                   target_kv_tokens=1024, draft_kv_tokens=1024))
    f32_onednn, f32_torch, f16_onednn, f16_torch = (profiler.profile_key(*k) for k in keys)
    assert f32_onednn != f32_torch
    assert f16_onednn == f16_torch != f32_torch
