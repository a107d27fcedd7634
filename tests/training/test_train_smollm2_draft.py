"""The one-run training script for the SmolLM2 draft, cut to seconds: it writes a draft that
goodspec loads and serves losslessly, and the same seed gives the same weights."""

import json

import pytest

from goodspec.training import engine_acceptance, train_smollm2_draft
from goodspec.workers.dtypes import cpu_has_native_bfloat16

TINY_RUN = ["--prompts", "6", "--reply-tokens", "16", "--steps", "2", "--eval-prompts", "2", "--eval-new-tokens", "8"]


@pytest.fixture(scope="module")
def recipe_draft(tmp_path_factory):
    work, out = tmp_path_factory.mktemp("work"), tmp_path_factory.mktemp("draft")
    train_smollm2_draft.main(["--out", str(out), "--work", str(work), *TINY_RUN])
    return work, out


def test_the_draft_is_written_as_goodspec_loads_it_with_its_report(recipe_draft):
    _, out = recipe_draft
    assert {"config.json", "model.safetensors", "feature_fc.safetensors", "vocab_map.json", "tokenizer.json",
            "report.json"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert report["train_sequences"] == 6 and report["config"]["steps"] == 2
    # "auto" precision is resolved for this CPU and recorded (emulated bfloat16 trains 25x slower)
    assert report["config"]["precision"] == ("bfloat16" if cpu_has_native_bfloat16() else "float32")
    assert report["eval_prompts"] == 2 and 0.0 <= report["greedy_acceptance"] <= 1.0
    assert 0.0 < report["draft_cost_ratio"] < 1.0 and report["draft_params"] < report["target_params"] / 10
    target_ids = json.loads((out / "vocab_map.json").read_text())["target_ids"]
    assert target_ids[0] == 0 and target_ids == sorted(target_ids) and len(target_ids) == report["draft_vocab"]


def test_goodspec_serves_it_and_speculation_stays_lossless(recipe_draft, capsys):
    _, out = recipe_draft
    engine_acceptance.main(["--draft", str(out), "--prompts", "2", "--new-tokens", "8", "--policies", "off,fixed:2"])
    report = json.loads(capsys.readouterr().out)
    assert report["fixed:2"]["outputs_equal_off"] == 2 and report["fixed:2"]["proposed"] > 0


def test_the_same_seed_gives_the_same_weights(recipe_draft, tmp_path):
    work, out = recipe_draft
    train_smollm2_draft.main(["--out", str(tmp_path), "--work", str(work), *TINY_RUN])  # replies cached
    for name in ("model.safetensors", "feature_fc.safetensors", "vocab_map.json"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name
