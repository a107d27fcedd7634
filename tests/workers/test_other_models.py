"""Any Hugging Face causal LM directory loads and runs the same way: two other architectures,
built here with random weights (no hub), checked against their own plain transformers forward."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from goodspec.workers.model_runner import ModelRunner, RunnerConfig
from tests.conftest import DEVICES


def _save(tmp_path, name, config):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    path = tmp_path / name
    model.save_pretrained(path)
    return path


CONFIGS = {
    # Qwen2: biases on q/k/v and 4:1 grouped-query attention.
    "qwen2": Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256),
    # Llama with an explicit head_dim that is not hidden_size / heads.
    "llama-headdim": LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                 head_dim=32, max_position_embeddings=256),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_paged_forward_matches_transformers_for_other_architectures(tmp_path, name, device):
    path = _save(tmp_path, name, CONFIGS[name])
    runner = ModelRunner(RunnerConfig(str(path), device=device, dtype="float32", kv_cache_tokens=512))
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    a, b = list(range(5, 45)), list(range(100, 113))
    first = runner.forward(["a", "b"], [0, 0], [a[:30], b[:9]], [30, 9])
    second = runner.forward(["b", "a"], [9, 30], [b[9:], a[30:]], [4, 10])
    with torch.no_grad():
        want_a = ref(input_ids=torch.tensor([a], device=device)).logits[0]
        want_b = ref(input_ids=torch.tensor([b], device=device)).logits[0]
    torch.testing.assert_close(torch.cat([first[:30], second[4:]]), want_a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat([first[30:], second[:4]]), want_b, atol=1e-4, rtol=1e-4)
