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
