"""The packed, paged forward against the plain Hugging Face forward of the shipped target."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from goodspec.config import DEFAULT_TARGET
from goodspec.workers.attention import AttentionMetadata
from goodspec.workers.kv_cache import KVCacheFullError
from goodspec.workers.model_runner import ModelRunner, RunnerConfig
from tests.conftest import DEVICES


@pytest.fixture(scope="module", params=DEVICES)
def runner(request):
    return ModelRunner(RunnerConfig(DEFAULT_TARGET, device=request.param, dtype="float32",
                                    kv_cache_tokens=1024))


@pytest.fixture(scope="module")
def reference(runner):
    return AutoModelForCausalLM.from_pretrained(DEFAULT_TARGET, dtype=torch.float32).to(runner.device).eval()


def _ref_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids], device=model.device)).logits[0]


def _two_packed_steps(runner, seed: int):
    """Three random sequences through two packed forwards: prompt chunks of different lengths,
    then a 6-token "verification" span, a 1-token decode and the rest of a prompt."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, 4000, (n,), generator=g).tolist() for n in (41, 7, 70)]
    first = runner.forward(["a", "b", "c"], [0, 0, 0], [seqs[0][:30], seqs[1][:6], seqs[2][:33]], [30, 1, 2])
    second = runner.forward(["c", "b", "a"], [33, 6, 30], [seqs[2][33:39], seqs[1][6:], seqs[0][30:]],
                            [6, 1, 11])
    return seqs, first, second


def test_one_forward_mixes_prompt_chunks_decodes_and_verification_spans(runner, reference):
    seqs, first, second = _two_packed_steps(runner, seed=0)
    want_a = _ref_logits(reference, seqs[0])
    want_b = _ref_logits(reference, seqs[1])
    want_c = _ref_logits(reference, seqs[2][:39])
    torch.testing.assert_close(torch.cat([first[:30], second[7:]]), want_a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(first[30], want_b[5], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(second[6], want_b[6], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(first[31:33], want_c[31:33], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(second[:6], want_c[33:39], atol=1e-4, rtol=1e-4)
    runner.free(["a", "b", "c"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_prompt_chunk_beside_decodes_is_attended_as_its_own_group(dtype):
    """A 40-token prompt chunk beside six 1-token decodes: the decodes are not padded to the
    chunk's 40 queries (two attention groups), and every row still equals the whole-sequence
    forward (float32: transformers' own; bfloat16: the same runner's single-group forwards)."""
    runner = ModelRunner(RunnerConfig(DEFAULT_TARGET, device="cpu", dtype=dtype, kv_cache_tokens=2048))
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(3, 4000, (n,), generator=g).tolist() for n in (20, 33, 9, 25, 14, 30, 40)]
    names = [f"s{i}" for i in range(7)]
    lens = [len(s) - 1 for s in seqs[:6]] + [0]
    runner.forward(names[:6], [0] * 6, [s[:-1] for s in seqs[:6]], [1] * 6)  # prompts, one group
    runner.cache.prepare(list(zip(names, lens, [1] * 6 + [40])))
    meta, _ = AttentionMetadata.build(runner.cache, names[:6], lens[:6], [1] * 6, runner.device)
    assert len(meta.groups) == 1 and meta.groups[0].token_index is None
    meta, _ = AttentionMetadata.build(runner.cache, names, lens, [1] * 6 + [40], runner.device)
    assert [group.pad_index.shape for group in meta.groups] == [(6, 1), (1, 40)]
    mixed = runner.forward(names, lens, [[s[-1]] for s in seqs[:6]] + [seqs[6]], [1] * 6 + [40])
    if dtype == "float32":
        reference = AutoModelForCausalLM.from_pretrained(DEFAULT_TARGET, dtype=torch.float32).eval()
        want = torch.stack([_ref_logits(reference, s)[-1] for s in seqs[:6]])
        want_chunk = _ref_logits(reference, seqs[6])
        tol = 1e-4
    else:
        alone = ModelRunner(RunnerConfig(DEFAULT_TARGET, device="cpu", dtype=dtype, kv_cache_tokens=2048))
        want = torch.cat([alone.forward([n], [0], [s], [1]) for n, s in zip(names[:6], seqs[:6])])
        want_chunk = alone.forward(["s6"], [0], [seqs[6]], [40])
        tol = 2e-2
    torch.testing.assert_close(mixed[:6], want, atol=tol, rtol=tol)
    torch.testing.assert_close(mixed[6:], want_chunk, atol=tol, rtol=tol)


def test_a_bfloat16_cpu_forward_agrees_with_the_float32_model():
    """The same two packed steps in bfloat16 on a CPU take the grouped-matmul attention; the logits
    stay within bfloat16's error of the float32 model's and pick the same token almost everywhere
    (a wrong head grouping or mask would not)."""
    runner = ModelRunner(RunnerConfig(DEFAULT_TARGET, device="cpu", dtype="bfloat16", kv_cache_tokens=1024))
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_TARGET, dtype=torch.float32).eval()
    seqs, first, second = _two_packed_steps(runner, seed=1)
    want = [_ref_logits(model, s) for s in (seqs[0], seqs[1], seqs[2][:39])]
    got = torch.cat([first[:30], second[7:], first[30:31], second[6:7], first[31:33], second[:6]]).float()
    ref = torch.cat([want[0], want[1][5:7], want[2][31:39]])
    assert (got - ref).abs().max() < 0.5 and (got - ref).abs().mean() < 0.05
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95
    runner.free(["a", "b", "c"])


def test_truncate_forgets_rejected_tokens(runner, reference):
    ids = list(range(100, 150))
    runner.forward(["t"], [0], [ids[:20] + [7, 7, 7]], [1])  # 3 "draft" tokens that get rejected
    out = runner.forward(["t"], [20], [ids[20:]], [30])  # continue at 20: the 7s are gone
    torch.testing.assert_close(out, _ref_logits(reference, ids)[20:], atol=1e-4, rtol=1e-4)
    runner.free(["t"])
    assert runner.cache.num_used_blocks == 0


def test_exhausted_budget_is_a_clear_error_and_admitted_sequences_are_unharmed(runner, reference):
    ids = list(range(200, 240))
    runner.forward(["keep"], [0], [ids[:20]], [1])
    free_before = runner.cache.num_free_blocks
    with pytest.raises(KVCacheFullError, match="KV cache full"):
        runner.forward(["keep", "huge"], [20, 0], [ids[20:21], list(range(3, 1003))], [1, 1])
    assert runner.cache.num_free_blocks == free_before and runner.cache.length("keep") == 20
    out = runner.forward(["keep"], [20], [ids[20:]], [20])
    torch.testing.assert_close(out, _ref_logits(reference, ids)[20:], atol=1e-4, rtol=1e-4)
    runner.free(["keep", "huge"])


def test_context_longer_than_the_model_is_refused(runner):
    with pytest.raises(ValueError, match="context is 1024"):
        runner.forward(["long"], [0], [[5] * 1025], [1])
    assert runner.cache.num_used_blocks == 0


def test_the_targets_hidden_states_for_a_feature_draft_are_its_committed_rows(runner, reference):
    """What a verification hands a feature draft: the target's post-norm last hidden state at
    each committed position (new tokens and accepted drafts), rejected drafts' rows left out."""
    from goodspec.workers.messages import VerifyBatch, VerifyItem
    from goodspec.workers.sampling import SamplingParams
    from goodspec.workers.target_worker import TargetWorker

    worker = TargetWorker.__new__(TargetWorker)
    worker.runner = runner
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 4000, (12,), generator=g).tolist()
    greedy = SamplingParams(seed=1)
    first = worker.verify(VerifyBatch([VerifyItem("f", 0, prompt, True, greedy)], want_features=True))
    with torch.no_grad():
        want = reference.model(input_ids=torch.tensor([prompt], device=runner.device)).last_hidden_state[0]
    assert first.features.dtype == torch.bfloat16 and first.features.shape == (12, want.shape[1])
    torch.testing.assert_close(first.features.float(), want.cpu().bfloat16().float(), atol=2e-2, rtol=2e-2)
    # Draft the target's own next token, then a wrong one: one accepted, one rejected.
    nxt = first.output_ids[0][0]
    with torch.no_grad():
        after = reference(input_ids=torch.tensor([prompt + [nxt]], device=runner.device)).logits[0, -1]
    wrong = int(after.argsort()[0])
    res = worker.verify(VerifyBatch([VerifyItem("f", 12, [nxt], True, greedy, [int(after.argmax()), wrong], -1)],
                                    want_features=True))
    assert res.num_accepted == [1] and res.features.shape[0] == 2  # the pending token + 1 accepted
    with torch.no_grad():
        full = reference.model(input_ids=torch.tensor([prompt + [nxt, int(after.argmax())]],
                                                      device=runner.device)).last_hidden_state[0]
    torch.testing.assert_close(res.features.float(), full[12:14].cpu().bfloat16().float(), atol=2e-2, rtol=2e-2)
    runner.free(["f"])


def test_a_fused_feature_draft_reads_normalised_block_outputs_before_the_last_state(runner, reference):
    """With feature_layers, a verification hands back [normalised outputs of those blocks; last
    state] per committed position: what goodspec.training.target_features wrote for training."""
    from goodspec.workers.feature_draft import normalised
    from goodspec.workers.messages import VerifyBatch, VerifyItem
    from goodspec.workers.sampling import SamplingParams
    from goodspec.workers.target_worker import TargetWorker

    worker = TargetWorker.__new__(TargetWorker)
    worker.runner = runner
    prompt = torch.randint(3, 4000, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    res = worker.verify(VerifyBatch([VerifyItem("L", 0, prompt, True, SamplingParams(seed=1))],
                                    want_features=True, feature_layers=(1, 2)))
    with torch.no_grad():
        out = reference.model(input_ids=torch.tensor([prompt], device=runner.device), output_hidden_states=True)
    want = torch.cat([normalised(out.hidden_states[1][0]), normalised(out.hidden_states[2][0]),
                      out.last_hidden_state[0]], -1)
    assert res.features.shape == want.shape
    torch.testing.assert_close(res.features.float(), want.cpu().bfloat16().float(), atol=3e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="decoder blocks"):
        runner.run(["L2"], [0], [[5]], [1], all_hidden=True, layers=(99,))
    runner.free(["L"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on a GPU machine)")
def test_cuda_attention_never_takes_cudnns_plan_per_shape_kernel():
    """cuDNN's SDPA builds a plan per new shape (100-200 ms on an H100); per-request k makes a new
    shape nearly every step. The runner's forwards must use the shape-agnostic kernel."""
    from torch.profiler import profile

    cuda = ModelRunner(RunnerConfig(DEFAULT_TARGET, device="cuda", dtype="bfloat16", kv_cache_tokens=1024))
    with profile() as prof:
        cuda.forward(["a", "b"], [0, 0], [list(range(5, 40)), list(range(7, 16))], [1, 3])
        cuda.forward(["a", "b"], [35, 9], [[11, 12, 13, 14], [15]], [4, 1])
    ops = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_efficient_attention" in ops
    assert not [op for op in ops if "cudnn_attention" in op]
