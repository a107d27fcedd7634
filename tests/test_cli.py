"""`goodspec generate` as a user runs it: a subprocess on the shipped pair."""

import json
import subprocess
import sys

PROMPTS = ["How do I bake bread at home?", "Write a haiku about the sea.", "What is Ray?"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "goodspec.cli", *args, *(("--model", "tiny") if args[0] in ("generate", "bench") else ())], capture_output=True,
                          text=True, timeout=300)


def test_generate_json_prints_one_object_per_prompt_in_order():
    res = run_cli("generate", "--in-process", "--policy", "fixed:3", "--max-new-tokens", "12", "--json",
                  "--device", "cpu", *PROMPTS)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    for r in rows:
        assert {"prompt", "text", "token_ids", "finish_reason", "draft_tokens_proposed",
                "draft_tokens_accepted"} <= set(r)
        assert r["finish_reason"] in {"length", "eos", "stop"}
        assert 0 < len(r["token_ids"]) <= 12
        assert 0 <= r["draft_tokens_accepted"] <= r["draft_tokens_proposed"]
    assert "draft acceptance" in res.stderr


def test_generate_off_and_fixed_agree_greedily():
    off = run_cli("generate", "--in-process", "--policy", "off", "--max-new-tokens", "10", "--json", *PROMPTS[:2])
    spec = run_cli("generate", "--in-process", "--policy", "fixed:5", "--max-new-tokens", "10", "--json", *PROMPTS[:2])
    assert off.returncode == spec.returncode == 0, off.stderr + spec.stderr
    ids = lambda res: [json.loads(line)["token_ids"] for line in res.stdout.splitlines()]  # noqa: E731
    assert ids(off) == ids(spec)
    assert all(json.loads(line)["draft_tokens_proposed"] == 0 for line in off.stdout.splitlines())


def test_bad_arguments_exit_2_with_the_setting_named():
    res = run_cli("generate", "--temperature", "-1", "hi")
    assert res.returncode == 2 and "temperature must be a finite number >= 0" in res.stderr
    res = run_cli("generate", "--policy", "sometimes", "hi")
    assert res.returncode == 2 and "unknown speculation policy 'sometimes'" in res.stderr
    res = run_cli("generate", "--target", "/nonexistent", "hi")
    assert res.returncode == 2 and "no Hugging Face model at /nonexistent" in res.stderr
