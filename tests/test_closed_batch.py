"""`python -m goodspec.closed_batch`: the in-process throughput table, on the tiny pair."""

import json

from goodspec.closed_batch import main


def test_the_table_compares_policies_on_the_same_prompts_and_outputs_stay_lossless(tmp_path, capsys):
    out = tmp_path / "runs.json"
    assert main(["--prompts", "4", "--max-new-tokens", "12", "--max-num-seqs", "4", "--replays", "2",
                 "--policies", "off,fixed:2,goodput", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "vs off" in printed and "goodput" in printed
    runs = {r["policy"]: r for r in json.loads(out.read_text())}
    assert list(runs) == ["off", "fixed:2", "goodput"]
    for r in runs.values():
        assert len(r["walls"]) == len(r["draft_ms"]) == len(r["verify_ms"]) == len(r["after_step_ms"]) == 2 and r["tokens"] == 4 * 12
        assert r["same_as_off"] == r["requests"] == 4  # greedy: every policy's output is off's
        assert len(r["records"]) == r["steps"]
    assert runs["off"]["mean_k"] == 0 and runs["off"]["acceptance"] is None
    assert runs["fixed:2"]["mean_k"] > 0 and 0 < runs["fixed:2"]["acceptance"] <= 1
    assert runs["off"]["draft_ms"] == [0, 0] and min(runs["fixed:2"]["draft_ms"]) > 0
    assert not any(k for step in runs["off"]["records"] for k in step["ks"])
    assert max(k for step in runs["fixed:2"]["records"] for k in step["ks"]) == 2


def test_the_bench_chat_workload_replays_on_the_real_pair_under_the_servers_token_budget(tmp_path, capsys):
    """`--workload chat`: the bench's chat requests (chat template, each its own output length)
    on SmolLM2 (float32, the CPU default), 64 tokens a step (so prompt chunks share steps with decodes) and
    proposer auto; greedy outputs of every policy equal off's. goodput starts without the profiling
    sweep (~100 s cold on this pair; tests/test_real_pair.py runs it) and learns from its own steps."""
    out = tmp_path / "runs.json"
    assert main(["--model", "smollm2", "--dtype", "float32", "--device", "cpu", "--workload", "chat",
                 "--prompts", "6", "--max-new-tokens", "8", "--max-num-seqs", "6", "--replays", "1",
                 "--max-num-batched-tokens", "64", "--proposer", "auto", "--policies", "off,goodput",
                 "--startup-profile", "off", "--out", str(out)]) == 0
    assert "6 chat prompts" in capsys.readouterr().out
    runs = {r["policy"]: r for r in json.loads(out.read_text())}
    assert runs["goodput"]["mean_k"] > 0  # unprofiled, goodput still speculates
    for r in runs.values():
        assert r["same_as_off"] == r["requests"] == 6
        assert all(step["verify_tokens"] <= 64 for step in r["records"])
        assert any(0 < step["num_decode"] < step["batch_size"] for step in r["records"])  # mixed steps


def test_the_mixed_workload_replays_with_its_sampled_requests_and_checks_only_the_greedy_ones(tmp_path, capsys):
    """`--workload mixed`: chat, copy and sampled requests in one trace; a sampled request's output
    depends on its k (its distribution does not), so only the greedy ones are compared with off's."""
    out = tmp_path / "runs.json"
    assert main(["--device", "cpu", "--workload", "mixed", "--prompts", "6", "--max-new-tokens", "8",
                 "--max-num-seqs", "6", "--replays", "1", "--proposer", "auto", "--policies", "off,fixed:2,goodput",
                 "--startup-profile", "off", "--out", str(out)]) == 0
    assert "6 mixed prompts" in capsys.readouterr().out
    runs = {r["policy"]: r for r in json.loads(out.read_text())}
    for r in runs.values():
        assert 0 < r["requests"] < 6  # the greedy ones
        assert r["same_as_off"] == r["requests"]
