"""Text from token ids on the step path: exact, incremental, and with stop strings, at a cost that
does not grow with the output's length."""

from __future__ import annotations

import random

import pytest

from goodspec.config import DEFAULT_TARGET
from goodspec.workers.tokenizer import IncrementalDetokenizer, TextCodec


@pytest.fixture(scope="module")
def codec() -> TextCodec:
    return TextCodec.load(DEFAULT_TARGET)


class _Counting:
    """Counts the tokens each decode is handed (the work the step path does)."""

    def __init__(self, codec: TextCodec) -> None:
        self.codec, self.tokens = codec, 0

    def __call__(self, ids):
        self.tokens += len(ids)
        return TextCodec.decode(self.codec, ids)


def test_stream_deltas_equal_the_whole_decode_cut_at_the_first_stop(codec):
    rng = random.Random(0)
    texts = ["Hello wörld! 你好 🙂 def f(x): return x**2\n\n- item", "The quick brown fox. STOP here",
             "naïve café 😀😀 ok"]
    for text in texts * 10:
        ids = codec.encode(text) + [rng.randrange(codec.vocab_size) for _ in range(rng.randrange(8))]
        stop = tuple(rng.sample(["STOP", "fox", "😀", "\n\n", "zzz"], 2))
        detok, out, n = IncrementalDetokenizer(codec, stop), "", 0
        while n < len(ids):
            n = min(len(ids), n + rng.randint(1, 3))
            out += detok.update(ids[:n], final=n == len(ids))
        assert out == codec.decode_output(ids, stop)


@pytest.mark.parametrize("length", [200, 4000])
def test_stop_matching_and_detokenising_cost_does_not_grow_with_output_length(codec, monkeypatch, length):
    """Per step: the new token's check and its text decode a bounded window, not the output."""
    rng = random.Random(1)
    ids = [rng.randrange(200, codec.vocab_size) for _ in range(length)]
    stop = ("x" * 256,) * 16  # the most a request may carry (max_stop_strings x max_stop_chars)
    counter = _Counting(codec)
    monkeypatch.setattr(codec, "decode", counter)
    detok = IncrementalDetokenizer(codec, stop)
    detok.update(ids[:-1])
    counter.tokens = 0
    codec.find_stop(ids, stop, 1)
    detok.update(ids)
    assert counter.tokens <= 2 * (4 * 256 + 3) + 10  # the same bound at 200 and 4000 tokens


def test_find_stop_fires_on_the_token_that_completes_the_stop_string(codec):
    ids = codec.encode("one two three four five")[1:]
    keep = next(n for n in range(1, len(ids) + 1) if "three" in codec.decode(ids[:n]))
    for n in range(1, keep):  # one new token per step, as the scheduler calls it
        assert codec.find_stop(ids[:n], ("three",), 1) is None
    assert codec.find_stop(ids[:keep], ("three",), 1) == keep
    assert codec.find_stop(ids[:keep + 2], ("three",), 3) == keep  # several new tokens at once
