"""goodspec.training.engine_acceptance on the real pair: the command runs, counts the draft's
accepted tokens, and finds every speculative output equal to `off`'s."""

import json

from goodspec.training.engine_acceptance import main


def test_fixed_k_outputs_equal_off_and_the_draft_is_accepted(capsys):
    main(["--prompts", "3", "--new-tokens", "12", "--policies", "off,fixed:2"])
    report = json.loads(capsys.readouterr().out)
    assert report["prompts"] == 3 and report["off"]["proposed"] == 0
    spec = report["fixed:2"]
    assert spec["outputs_equal_off"] == 3
    assert spec["output_tokens"] == report["off"]["output_tokens"] > 0
    assert 0 < spec["accepted"] <= spec["proposed"]
