"""The draft-distillation losses on hand-made teacher rows (no model: they read logits and records)."""

import torch

from goodspec.training.distill_smollm2 import ce_to_teacher_top1, kl_to_teacher, to_draft_ids

# target ids 0..9; the draft keeps 0 (where every other id maps), 2, 5 and 7
TABLE = to_draft_ids([0, 2, 5, 7], 10)


def row(top_ids: list[list[int]], top_p: list[list[float]]) -> dict:
    return {"top_ids": torch.tensor(top_ids, dtype=torch.int32),
            "top_logp": torch.tensor(top_p).log().half()}


def test_the_kl_is_least_where_the_draft_matches_the_teacher_within_its_vocabulary():
    # position 0: 5 (0.6), 2 (0.3) and 9 (outside, 0.1) -> within the vocabulary 2/3 and 1/3
    rows = [row([[5, 2, 9]], [[0.6, 0.3, 0.1]])]
    matched = torch.log(torch.tensor([[1e-9, 1 / 3, 2 / 3, 1e-9]]))
    for other in ([[0.0, 0.0, 5.0, 0.0]], [[0.0, 2.0, 2.0, 0.0]], [[0.0, 0.0, 0.0, 3.0]]):
        assert kl_to_teacher(matched, rows, TABLE) < kl_to_teacher(torch.tensor(other), rows, TABLE)


def test_the_top1_cross_entropy_rewards_only_the_teachers_argmax_and_skips_one_outside():
    rows = [row([[5, 2], [9, 7]], [[0.5, 0.4], [0.7, 0.2]])]  # second position's best is outside
    sure = torch.tensor([[0.0, 0.0, 9.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    hedged = torch.tensor([[0.0, 4.0, 4.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    wrong = torch.tensor([[0.0, 9.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert ce_to_teacher_top1(sure, rows, TABLE) < ce_to_teacher_top1(hedged, rows, TABLE)
    assert ce_to_teacher_top1(hedged, rows, TABLE) < ce_to_teacher_top1(wrong, rows, TABLE)
    # the skipped position adds nothing whatever the draft says there
    moved = sure.clone()
    moved[1] = torch.tensor([0.0, 0.0, 0.0, 9.0])
    assert torch.isclose(ce_to_teacher_top1(sure, rows, TABLE), ce_to_teacher_top1(moved, rows, TABLE))
