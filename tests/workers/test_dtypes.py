"""Model dtypes by name, and the draft's "auto": bfloat16 where float32 would run on a CPU with
native bfloat16."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from goodspec.config import DEFAULT_TARGET, EngineConfig
from goodspec.workers import dtypes
from goodspec.workers.dtypes import resolve_dtype
from goodspec.workers.model_runner import ModelRunner, RunnerConfig

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("native", [True, False])
def test_only_a_float32_cpu_model_asked_to_becomes_bfloat16_and_only_where_native(monkeypatch, native):
    monkeypatch.setattr(dtypes, "cpu_has_native_bfloat16", lambda: native)  # the host's CPU is fixed
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("auto", CPU, bfloat16_on_native_cpu=True) == (torch.bfloat16 if native else torch.float32)
    assert resolve_dtype("float32", CPU, bfloat16_on_native_cpu=True) == (torch.bfloat16 if native else torch.float32)
    assert resolve_dtype("float16", CPU, bfloat16_on_native_cpu=True) == torch.float16
    assert resolve_dtype("auto", CUDA, bfloat16_on_native_cpu=True) == torch.bfloat16
    assert resolve_dtype("float32", CUDA, bfloat16_on_native_cpu=True) == torch.float32


def test_the_probe_agrees_with_the_kernels_cpu_flags():
    """torch's probes are private API (guarded); on Linux the kernel lists the same features."""
    native = dtypes.cpu_has_native_bfloat16()
    assert isinstance(native, bool)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = set(cpuinfo.read_text().split())
        assert native == bool({"avx512_bf16", "amx_bf16", "amx_tile"} & flags)


def test_the_draft_follows_the_targets_dtype_unless_set():
    def dtype_of(**kw):
        runner = EngineConfig(model="tiny", **kw).draft_runner_config()
        return runner.dtype, runner.bfloat16_on_native_cpu, runner.int8_weights

    assert dtype_of() == ("auto", True, "auto")
    assert dtype_of(dtype="float16") == ("float16", True, "auto")
    assert dtype_of(draft_dtype="float32") == ("float32", False, "off")


def test_the_engine_config_builds_both_runners_configs():
    cfg = EngineConfig(model="tiny", device="cpu", threads=2, draft_threads=1, target_kv_tokens=4096,
                       draft_kv_tokens=1024, block_size=32, cpu_linear="torch")
    target = cfg.target_runner_config()
    assert (target.model_dir, target.device, target.kv_cache_tokens, target.block_size, target.threads,
            target.cpu_linear, target.bfloat16_on_native_cpu) == (cfg.target_dir, "cpu", 4096, 32, 2, "torch", False)
    draft = cfg.draft_runner_config("cuda")
    assert (draft.model_dir, draft.device, draft.kv_cache_tokens, draft.threads) == (cfg.draft_dir, "cuda", 1024, 1)
    assert cfg.draft_runner_config(threads=2).threads == 2  # in process: the target's threads
    with pytest.raises(ValueError, match="no draft"):
        EngineConfig(model="tiny", draft_dir="none", policy="off").draft_runner_config()


@pytest.mark.parametrize("field", ["dtype", "draft_dtype"])
def test_an_unknown_dtype_is_refused_naming_its_field(field):
    with pytest.raises(ValueError, match=f"^{field} must be auto, float32, float16, bfloat16(, int8)?; got 'bf16'"):
        EngineConfig(model="tiny", **{field: "bf16"})
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("half", CPU)


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_on_a_cpu_without_it_natively_is_warned_about_in_one_line(monkeypatch, caplog, native):
    monkeypatch.setattr(dtypes, "cpu_has_native_bfloat16", lambda: native)  # the host's CPU is fixed
    assert (dtypes.emulated_bfloat16_note(CPU, torch.bfloat16) is None) == native
    assert dtypes.emulated_bfloat16_note(CPU, torch.float32) is None
    assert dtypes.emulated_bfloat16_note(CUDA, torch.bfloat16) is None
    with caplog.at_level(logging.WARNING, logger="goodspec.workers"):  # (torch's linears: packing needs it native)
        ModelRunner(RunnerConfig(DEFAULT_TARGET, device="cpu", dtype="bfloat16", kv_cache_tokens=256,
                                 cpu_linear="torch"))
    warned = [r for r in caplog.records if "emulated" in r.getMessage()]
    assert len(warned) == (0 if native else 1)
    assert all("\n" not in r.getMessage() and DEFAULT_TARGET in r.getMessage() for r in warned)
