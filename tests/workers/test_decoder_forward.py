"""The runner's lean decoder forward gives transformers' forward's outputs bit for bit (logits,
hidden states, captured blocks) for the SmolLM2 pair in its serving dtypes (float32 target,
bfloat16 draft with int8 weights) and the tiny pair in float32, on a batch that mixes prompts, a
decode and a verification, with its q/k/v and gate/up projections joined where the runner joins
them (float32, packed oneDNN linears); other model types keep transformers' forward."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from goodspec.config import DEFAULT_DRAFT, DEFAULT_TARGET, SMOLLM2_DRAFT, model_pair
from goodspec.workers import model_runner
from goodspec.workers.cpu_linear import uses_onednn
from goodspec.workers.decoder_forward import LeanDecoder
from goodspec.workers.model_runner import ModelRunner, RunnerConfig


def _steps(runner: ModelRunner, prefix: str, layers: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(3, 4000, (n,), generator=g).tolist() for n in (21, 10, 12))
    s = [f"{prefix}{name}" for name in "abc"]
    return [
        runner.run(s[:2], [0, 0], [a[:20], b[:7]], [1, 1], all_hidden=True, layers=layers),  # prompts
        runner.run(s, [20, 7, 0], [a[20:], b[7:], c], [1, 3, 2], all_hidden=True, layers=layers),  # mixed
        runner.run(s[1:], [10, 12], [[5], [6]], [1, 1], all_hidden=True, layers=layers),  # decodes
    ]


RUNNERS = {
    "tiny target": lambda: RunnerConfig(DEFAULT_TARGET, device="cpu", dtype="float32", kv_cache_tokens=512),
    "tiny draft": lambda: RunnerConfig(DEFAULT_DRAFT, device="cpu", dtype="float32", kv_cache_tokens=512),
    "smollm2 target": lambda: RunnerConfig(model_pair("smollm2")[0], device="cpu", dtype="float32",
                                           kv_cache_tokens=512),
    "smollm2 draft int8": lambda: RunnerConfig(SMOLLM2_DRAFT, device="cpu", dtype="bfloat16", kv_cache_tokens=512,
                                               int8_weights="on"),
    "smollm2 draft float32 int8": lambda: RunnerConfig(SMOLLM2_DRAFT, device="cpu", dtype="float32",
                                                       kv_cache_tokens=512, int8_weights="on"),
}


@pytest.mark.parametrize("name", sorted(RUNNERS))
def test_the_lean_forward_equals_transformers_forward_bit_for_bit(name, monkeypatch):
    config = RUNNERS[name]()
    runner = ModelRunner(config)
    assert runner.lean_decoder is not None  # both pairs are Llama models
    joins = (config.int8_weights == "off" and config.dtype == "float32"
             and uses_onednn("onednn", torch.device("cpu"), torch.float32))
    assert runner.fused_layers == (runner.model.config.num_hidden_layers if joins else 0)
    layers = (1,) if runner.feature_input is None else ()  # a block's output, where one is read
    lean = _steps(runner, "lean-", layers)
    # transformers' LlamaModel.forward, same weights, fresh sequences: a joined model has no
    # separate projections for it to call, so the reference runner keeps them apart
    monkeypatch.setattr(model_runner, "fuse_projections", lambda model: 0)
    reference_runner = ModelRunner(config) if runner.fused_layers else runner
    reference_runner.lean_decoder = None
    reference = _steps(reference_runner, "hf-", layers)
    for (logits, hidden), (want_logits, want_hidden) in zip(lean, reference):
        assert torch.equal(logits, want_logits)
        assert torch.equal(hidden, want_hidden)


def test_other_model_types_keep_transformers_forward():
    qwen2 = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    assert LeanDecoder.for_model(qwen2) is None and LeanDecoder.for_model(gpt2) is None
