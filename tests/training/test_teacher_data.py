"""The target's hidden states kept from its own generation equal a second pass over the text."""

import pytest
import torch


@pytest.fixture(scope="module")
def bf16_target():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from goodspec.gguf_import import converted_dir, smollm2_gguf_path

    path = converted_dir(smollm2_gguf_path(), progress=False)
    return (AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval(),
            AutoTokenizer.from_pretrained(path))


def test_states_kept_from_generation_match_a_teacher_forced_pass(bf16_target):
    from goodspec.training.target_features import hidden_states
    from goodspec.training.teacher_data import record_sequence, render, target_replies, target_replies_and_states

    target, tokenizer = bf16_target
    torch.set_num_threads(2)
    # different lengths: left padding in one batch, and one reply that ends before the others
    prompts = [render(tokenizer, text, 64) for text in
               ("Say hi.", "Name three rivers in Europe and say which is longest.", "What is 2 + 2? Answer with a digit.")]
    records, states = target_replies_and_states(target, tokenizer, prompts, 24, 3, 5, "test")
    assert [r["reply"] for r in records] == [r["reply"] for r in target_replies(target, tokenizer, prompts, 24, 3, 5, "t")]
    assert len({len(r["reply"]) for r in records}) > 1
    seqs = [record_sequence(r) for r in records]
    again = hidden_states(target, seqs, 3072, "test")
    for seq, kept, forced in zip(seqs, states, again):
        assert kept.dtype == torch.bfloat16 and kept.shape == forced.shape == (len(seq), target.config.hidden_size)
        cos = torch.nn.functional.cosine_similarity(kept.float(), forced.float(), dim=-1)
        assert float(cos.min()) > 0.995, cos  # measured 0.999 (bfloat16 rounding); one position off: 0.03


def test_the_states_are_cached_beside_the_records_and_read_back_without_a_target(bf16_target, tmp_path):
    from goodspec.training.distill_smollm2 import DistillConfig
    from goodspec.training.target_features import cached_features
    from goodspec.training.teacher_data import cached_replies_and_states, render

    target, tokenizer = bf16_target
    prompts = [render(tokenizer, "Tell me a fact about owls.", 64), render(tokenizer, "Hello!", 64)]
    cfg = DistillConfig(new_tokens=8, gen_batch=2, top_logprobs=3)
    data, states = cached_replies_and_states(target, tokenizer, prompts, cfg, tmp_path / "replies")
    records, feats = cached_features(None, tmp_path / "replies")  # no target: every part is cached
    assert [r["reply"] for r in records] == [r["reply"] for r in data]
    assert [len(f) for f in feats] == [len(r["prompt"]) + len(r["reply"]) - 1 for r in records]
    assert all(torch.equal(a, b) for a, b in zip(states, feats, strict=True))


def test_teacher_forced_parts_cache_their_states_the_same_way(bf16_target, tmp_path):
    from goodspec.training.distill_smollm2 import DistillConfig
    from goodspec.training.target_features import cached_features
    from goodspec.training.teacher_data import cached_forced, render

    target, tokenizer = bf16_target
    pairs = [(render(tokenizer, "Hello!", 64), tokenizer("Hi there! How can I help?")["input_ids"])]
    data = cached_forced(target, pairs, DistillConfig(top_logprobs=3), tmp_path / "forced")
    again = cached_forced(None, pairs, DistillConfig(), tmp_path / "forced")  # cached: no target runs
    assert torch.equal(again[0]["top_ids"], data[0]["top_ids"])
    records, feats = cached_features(None, tmp_path / "forced")
    assert records[0]["reply"] == data[0]["reply"] == pairs[0][1]
    assert feats[0].shape[0] == len(pairs[0][0]) + len(pairs[0][1]) - 1
