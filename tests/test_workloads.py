"""The workloads `goodspec bench` replays: ShareGPT-derived ones and a user's JSONL file."""

from __future__ import annotations

import json

import pytest

from goodspec.config import DEFAULT_TARGET
from goodspec.gguf_import import converted_dir, smollm2_gguf_path
from goodspec.workers.tokenizer import TextCodec
from goodspec.workloads import COPY_INSTRUCTIONS, build_workload


@pytest.fixture(scope="module")
def codec():
    return TextCodec.load(DEFAULT_TARGET)


def test_mixed_interleaves_chat_copy_and_sampled_requests_reproducibly(codec):
    items = build_workload("mixed", codec, 30, seed=3, chat=False)
    assert len(items) == 30 and build_workload("mixed", codec, 30, seed=3, chat=False) == items
    kinds = [it.kind for it in items]
    assert {kinds.count(k) for k in ("chat", "copy", "sampled")} == {10}
    assert kinds != sorted(kinds), "one trace, interleaved"
    for it in items:
        assert 1 <= it.max_new_tokens <= 128
        if it.kind == "sampled":
            assert 0.7 <= it.temperature <= 1.0
        else:
            assert it.temperature == 0.0
        if it.kind == "copy":
            assert it.prompt.startswith(COPY_INSTRUCTIONS)


def test_a_jsonl_workload_is_read_and_each_bad_line_is_named(tmp_path):
    codec = TextCodec.load(str(converted_dir(smollm2_gguf_path())))  # messages need a chat template
    good = tmp_path / "trace.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Hello", "max_new_tokens": 8},
        {"messages": [{"role": "user", "content": "Hi"}], "max_new_tokens": 4, "temperature": 0.8, "kind": "mine"},
    ]) + "\n\n")
    items = build_workload(str(good), codec, 10, seed=0, chat=False)
    assert [(it.max_new_tokens, it.temperature, it.kind) for it in items] == [(8, 0.0, "file"), (4, 0.8, "mine")]
    assert items[1].prompt == codec.render_chat([("user", "Hi")])
    for line, message in [
        ("{", "not JSON"),
        ('{"prompt": "x", "max_new_tokens": 0}', "max_new_tokens"),
        ('{"prompt": "x", "max_new_tokens": 5, "temperature": 3}', "temperature"),
        ('{"prompt": "x", "messages": [], "max_new_tokens": 5}', "exactly one of"),
        ('{"prompt": "x", "max_new_tokens": 5, "extra": 1}', "unknown keys"),
        ('[1, 2]', "expected an object"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "ok", "max_new_tokens": 3}\n' + line + "\n")
        with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{message}"):
            build_workload(str(bad), codec, 10, seed=0, chat=False)
    with pytest.raises(ValueError, match="not one of chat, copy, sampled, mixed"):
        build_workload("nonsense", codec, 10, seed=0)


def test_a_limit_of_zero_prompts_yields_none():
    """(`distill_smollm2 --data-only --train-prompts 0` generated one reply: a limit of 0 was
    checked only after the first prompt was yielded.)"""
    from goodspec.sharegpt import first_turn_prompts

    assert list(first_turn_prompts(held_out=False, limit=0)) == []
    assert len(list(first_turn_prompts(held_out=False, limit=2))) == 2


def test_later_turn_prompts_are_the_training_conversations_later_user_turns():
    """Training data beyond first turns: each conversation's second and later user turns, long
    enough to ask something, from the training split only."""
    import itertools

    from goodspec.sharegpt import MIN_LATER_TURN_CHARS, exchanges, iter_conversations, later_turn_prompts

    got = list(later_turn_prompts(held_out=False, limit=20))
    want = [text for conv in iter_conversations() if not conv.is_held_out()
            for text, _ in itertools.islice(exchanges(conv), 1, None)
            if len(text.strip()) >= MIN_LATER_TURN_CHARS]
    assert got == want[:20]
    held_out_firsts = {text for conv in itertools.islice(iter_conversations(), 2000) if conv.is_held_out()
                       for text, _ in exchanges(conv)}
    assert not held_out_firsts & set(later_turn_prompts(held_out=False, limit=500))
    assert list(later_turn_prompts(held_out=False, limit=0)) == []
