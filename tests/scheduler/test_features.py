"""The feature buffer: which of the target's hidden states a feature draft reads, and when a
request stops holding them."""

from __future__ import annotations

import torch

from goodspec.scheduler.features import FeatureBuffer


def rows(first: int, n: int) -> torch.Tensor:
    """Rows whose value is their position, so a test reads which position a row came from."""
    return torch.arange(first, first + n, dtype=torch.float32)[:, None].expand(n, 3).clone()


def test_a_token_reads_the_row_of_the_position_before_it_and_position_zero_reads_zeros():
    buf = FeatureBuffer()
    buf.put(0, rows(0, 5))  # the prompt's prefill: positions 0..4
    got = buf.take(0, 6, 3)  # the draft's first proposal feeds tokens 0..5
    assert got[:, 0].tolist() == [0, 0, 1, 2, 3, 4]
    assert got[0].eq(0).all()  # position -1: nothing came before the first token


def test_rows_read_are_dropped_and_a_verification_appends_from_its_start():
    buf = FeatureBuffer()
    buf.put(0, rows(0, 5))
    buf.drop_before(5)  # the draft read everything up to token 5 (its feature: row 4)
    assert buf.rows is None
    buf.put(5, rows(5, 3))  # the next verification committed tokens 5, 6, 7
    assert buf.take(6, 3, 3)[:, 0].tolist() == [5, 6, 7]
    buf.drop_before(8)
    assert buf.rows is None


def test_a_rolled_back_position_is_replaced_and_a_lost_row_reads_as_zeros():
    buf = FeatureBuffer()
    buf.put(10, rows(10, 4))
    buf.put(12, rows(100, 1))  # the target recomputed position 12: 13 is gone with it
    assert buf.end == 13 and buf.take(11, 3, 3)[:, 0].tolist() == [10, 11, 100]
    buf.clear()
    assert buf.take(3, 2, 3).eq(0).all()  # after a draft restart: zeros, never another row
    buf.put(20, rows(20, 2))
    assert buf.take(19, 4, 3)[:, 0].tolist() == [0, 0, 20, 21]
