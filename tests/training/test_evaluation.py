"""The held-out evaluation's acceptance and its standard error over replies (no model needed)."""

import math

import torch

from goodspec.training.distill_feature_draft import clustered_rate


def test_equal_length_replies_give_the_standard_error_of_their_mean_rate():
    hits = torch.tensor([30.0, 40.0, 50.0, 20.0])
    totals = torch.full((4,), 64.0)
    rate, se = clustered_rate(hits, totals)
    per_reply = hits / totals
    assert math.isclose(rate, float(per_reply.mean()))
    assert math.isclose(se, float(per_reply.std() / 2), rel_tol=1e-6)  # sample sd / sqrt(4)


def test_the_rate_weighs_replies_by_length_and_agreeing_replies_leave_no_error():
    rate, se = clustered_rate(torch.tensor([90.0, 0.0]), torch.tensor([90.0, 10.0]))
    assert math.isclose(rate, 0.9) and se > 0
    rate, se = clustered_rate(torch.tensor([30.0, 15.0, 6.0]), torch.tensor([60.0, 30.0, 12.0]))
    assert math.isclose(rate, 0.5) and se == 0.0


def test_eval_only_scores_the_shipped_draft_without_writing_anything(capsys):
    import json
    from pathlib import Path

    from goodspec.config import SMOLLM2_DRAFT
    from goodspec.training.distill_feature_draft import main

    before = {p: p.stat().st_mtime for p in Path(SMOLLM2_DRAFT).iterdir()}
    main(["--eval-only", "--from-feature-draft", SMOLLM2_DRAFT, "--eval-prompts", "2", "--eval-new-tokens", "40"])
    report = json.loads(capsys.readouterr().out)
    assert report["eval_prompts"] == 2 and report["eval_new_tokens"] == 40
    bands = report["greedy_acceptance_by_reply_position"]
    assert set(bands) <= {"0-31", "32-63"}
    assert sum(b["positions"] for b in bands.values()) == report["acceptance_positions"] > 0
    assert 0.0 < report["greedy_acceptance"] < 1.0 and report["greedy_acceptance_standard_error"] >= 0.0
    assert {p: p.stat().st_mtime for p in Path(SMOLLM2_DRAFT).iterdir()} == before
