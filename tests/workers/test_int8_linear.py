"""int8 draft weights on a CPU: few-row inputs within the int8 rounding bound and larger ones
exactly the layer's own dtype's (bfloat16 or float32), every linear of a draft's decoder and
output layer swapped (not its feature layer), the engine's output still the target's, the
draft's "auto" choosing them only where it should, and refused where they do not apply."""

import pytest
import torch
from torch import nn

from goodspec.config import DEFAULT_DRAFT, DEFAULT_TARGET, SMOLLM2_DRAFT, EngineConfig
from goodspec.workers import dtypes
from goodspec.workers.cpu_linear import PackedOneDNNLinear, uses_onednn
from goodspec.workers.int8_linear import INT8_MAX_ROWS, Int8WeightLinear, uses_int8
from goodspec.workers.model_runner import ModelRunner, RunnerConfig
from goodspec.workers.sampling import SamplingParams
from tests.workers.cpu_support import onednn_packs_bfloat16

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_are_within_the_int8_rounding_bound_and_more_rows_are_bfloat16s(bias):
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(576, 1536, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(1536, 576, generator=g) * 0.05)
    linear.requires_grad_(False)
    linear = linear.to(torch.bfloat16)  # as in a bfloat16 draft
    q = Int8WeightLinear(linear)
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.shape == (1536, 576)
    assert q.weight.dtype == torch.bfloat16
    few = torch.randn(2, 2, 576, generator=g).to(torch.bfloat16)  # 4 rows: the int8 kernel
    assert few.shape[0] * few.shape[1] == INT8_MAX_ROWS
    got = q(few).float()
    want = torch.nn.functional.linear(few.float(), linear.weight.float(),
                                      None if linear.bias is None else linear.bias.float())
    assert got.shape == (2, 2, 1536)
    # |W - s W_int8| <= s / 2 per element, so |error| <= sum|x| s / 2, plus bfloat16's rounding
    # of the scales and the output (2^-8 relative each).
    scales = linear.weight.float().abs().amax(1)
    bound = few.float().abs().sum(-1, keepdim=True) * scales / 127 / 2 + want.abs() * 2 ** -7 + 1e-3
    assert bool(((got - want).abs() <= bound).all())
    assert float((got - want).norm() / want.norm()) < 0.01
    assert not torch.equal(got, linear(few).float())
    many = torch.randn(INT8_MAX_ROWS + 1, 576, generator=g).to(torch.bfloat16)  # the bfloat16 weight
    plain = linear
    with torch.no_grad():
        assert torch.equal(q(many), plain(many))
    if not onednn_packs_bfloat16():
        pytest.skip("this CPU cannot run oneDNN's packed bfloat16 kernel (no AVX-512)")
    packed = Int8WeightLinear(linear, packed=True)  # that weight in oneDNN's layout: the same products
    with torch.no_grad():
        assert torch.equal(packed(many), plain(many))
        assert torch.equal(packed(few), q(few))  # few rows take the int8 kernel either way


def test_in_a_float32_draft_few_rows_are_within_the_int8_bound_and_more_rows_are_float32s():
    """A CPU without native bfloat16 runs the draft in float32 with int8 weights: few rows go
    through the int8 kernel in bfloat16 and come back float32, more rows take the float32 weight
    (packed or not) exactly."""
    g = torch.Generator().manual_seed(2)
    linear = nn.Linear(576, 1536, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(1536, 576, generator=g) * 0.05)
    linear.requires_grad_(False)
    q = Int8WeightLinear(linear)
    assert q.weight.dtype == torch.float32 and q.weight_int8.dtype == torch.int8
    few = torch.randn(1, INT8_MAX_ROWS, 576, generator=g)
    got, want = q(few), linear(few)
    assert got.dtype == torch.float32 and got.shape == (1, INT8_MAX_ROWS, 1536)
    assert not torch.equal(got, want)  # the int8 kernel ran
    # the int8 rounding bound, plus bfloat16's rounding of the inputs, scales and the product
    scales = linear.weight.abs().amax(1)
    bound = few.abs().sum(-1, keepdim=True) * scales / 127 / 2 + want.abs() * 2 ** -6 + 1e-3
    assert bool(((got - want).abs() <= bound).all())
    assert float((got - want).norm() / want.norm()) < 0.01
    many = torch.randn(INT8_MAX_ROWS + 1, 576, generator=g)
    with torch.no_grad():
        assert torch.equal(q(many), linear(many))
        if uses_onednn("onednn", CPU, torch.float32):
            packed = Int8WeightLinear(linear, packed=True)
            assert torch.equal(packed(many), PackedOneDNNLinear(linear)(many))  # the packed float32 weight
            assert torch.equal(packed(few), q(few))


def _draft(model_dir: str, int8: str, cpu_linear: str = "onednn") -> ModelRunner:
    return ModelRunner(RunnerConfig(model_dir, device="cpu", dtype="bfloat16", kv_cache_tokens=512,
                                    int8_weights=int8, cpu_linear=cpu_linear))


@pytest.mark.parametrize("model_dir", [DEFAULT_DRAFT, SMOLLM2_DRAFT], ids=["tiny", "smollm2"])
def test_every_linear_of_a_drafts_decoder_is_swapped_and_its_logits_stay_close(model_dir):
    plain, q = _draft(model_dir, "off", cpu_linear="torch"), _draft(model_dir, "on")
    linears = sum(type(m) is nn.Linear for m in plain.model.modules())
    assert (plain.int8_linears, plain.weights) == (0, "bfloat16")
    assert (q.int8_linears, q.weights) == (linears, "int8") and linears > 0
    feature = 0 if plain.feature_input is None else sum(type(m) is nn.Linear for m in plain.feature_input.modules())
    # their own packing, and the feature layer's packed bfloat16 linear
    assert q.onednn_linears == (linears + feature if uses_onednn("onednn", CPU, torch.bfloat16) else 0)
    assert not any(type(m) is nn.Linear for m in q.model.modules())
    if q.feature_input is not None:  # it reads the target's states, outliers and all: kept bfloat16
        assert all(type(m) is not Int8WeightLinear for m in q.feature_input.modules())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 2000, (24,), generator=g).tolist()
    plain.forward(["a"], [0], [ids[:20]], [1])
    q.forward(["a"], [0], [ids[:20]], [1])
    want = torch.cat([plain.forward(["a"], [20 + i], [[t]], [1]) for i, t in enumerate(ids[20:])])
    got = torch.cat([q.forward(["a"], [20 + i], [[t]], [1]) for i, t in enumerate(ids[20:])])  # 1-row passes
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))  # a reduced vocabulary stays -inf outside it
    assert not torch.equal(got, want)  # the int8 kernel ran
    assert float((got[finite] - want[finite]).abs().mean() / want[finite].abs().mean()) < 0.05
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_int8_draft_weights_leave_greedy_output_the_targets():
    from goodspec.engine import LLMEngine

    prompts = ["The quick brown fox", "Once upon a time", "In a distant land there lived"]
    out = {}
    for dd in ("float32", "int8"):
        for policy in ("off", "fixed:3"):
            engine = LLMEngine(EngineConfig(model="tiny", policy=policy, device="cpu", dtype="float32",
                                            draft_dtype=dd, target_kv_tokens=2048, draft_kv_tokens=2048))
            got = engine.generate(prompts, SamplingParams(max_new_tokens=24))
            out[dd, policy] = [c.token_ids for c in got]
            if policy != "off":
                assert sum(c.usage.draft_tokens_accepted for c in got) > 0
        assert engine.draft.runner.weights == dd
    assert out["int8", "fixed:3"] == out["float32", "fixed:3"] == out["float32", "off"] == out["int8", "off"]


@pytest.mark.parametrize("native", [True, False])
def test_the_drafts_auto_takes_int8_weights_on_a_cpu_in_float32_or_native_bfloat16(monkeypatch, native):
    monkeypatch.setattr(dtypes, "cpu_has_native_bfloat16", lambda: native)  # the host's CPU is fixed
    assert uses_int8("auto", CPU, torch.bfloat16) == native  # emulated bfloat16 is slower than float32
    assert uses_int8("auto", CPU, torch.float32)
    assert not uses_int8("auto", CPU, torch.float16)
    assert not uses_int8("auto", CUDA, torch.bfloat16) and not uses_int8("auto", CUDA, torch.float32)
    assert uses_int8("on", CPU, torch.bfloat16) and not uses_int8("off", CPU, torch.bfloat16)
    runner = lambda **kw: EngineConfig(model="tiny", **kw).draft_runner_config()  # noqa: E731
    assert (runner().dtype, runner().int8_weights) == ("auto", "auto")
    assert (runner(draft_dtype="int8").dtype, runner(draft_dtype="int8").int8_weights) == ("bfloat16", "on")
    assert runner(draft_dtype="bfloat16").int8_weights == "off"
    assert runner(draft_dtype="float32").int8_weights == "off"  # float32 asked for: float32 weights
    if native and not onednn_packs_bfloat16():
        pytest.skip("this CPU cannot run oneDNN's packed bfloat16 kernel (no AVX-512)")
    draft = ModelRunner(EngineConfig(model="tiny", device="cpu", draft_kv_tokens=256).draft_runner_config())
    assert (draft.weights, draft.dtype) == ("int8", torch.bfloat16 if native else torch.float32)


def test_int8_is_a_draft_dtype_on_a_cpu_only():
    with pytest.raises(ValueError, match="^dtype must be auto, float32, float16, bfloat16; got 'int8'"):
        EngineConfig(model="tiny", dtype="int8")  # the target's weights are never quantised
    with pytest.raises(ValueError, match="int8 weights run in a bfloat16 or float32 model; got dtype 'float16'"):
        RunnerConfig(DEFAULT_DRAFT, dtype="float16", int8_weights="on")
    with pytest.raises(ValueError, match="int8_weights must be off, on, auto"):
        RunnerConfig(DEFAULT_DRAFT, dtype="bfloat16", int8_weights="yes")
    with pytest.raises(ValueError, match="on a CPU only"):  # refused before any loading
        ModelRunner(RunnerConfig(DEFAULT_DRAFT, device="cuda", dtype="bfloat16", int8_weights="on"))


def test_step_time_profiles_are_cached_per_draft_weights(monkeypatch):
    """An int8 draft's batch-1 passes cost about half a bfloat16 one's, and a float32 draft's
    with int8 copies (auto without native bfloat16) about three quarters of a float32 one's: a
    profile measured with one must not seed an engine running the other."""
    import goodspec.scheduler.profiler as profiler
    from goodspec.engine import LLMEngine

    keys = []
    monkeypatch.setattr(profiler, "warm_up_goodput", lambda _sched, _tokens, key: keys.append(key))
    drafts = {}
    for dd in ("bfloat16", "int8", "float32", "auto"):
        engine = LLMEngine(EngineConfig(target_dir=DEFAULT_TARGET, draft_dir=DEFAULT_DRAFT, policy="goodput",
                                        device="cpu", dtype="float32", draft_dtype=dd,
                                        target_kv_tokens=1024, draft_kv_tokens=1024))
        drafts[dd] = engine.draft.runner
    bf16, int8, f32, auto = (profiler.profile_key(*k) for k in keys)
    assert bf16 != int8
    assert drafts["float32"].weights == "float32" and drafts["auto"].int8_linears > 0
    assert f32 != auto
