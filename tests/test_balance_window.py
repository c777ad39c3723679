"""Sliding windows over cumulative counters, with plain values and a fake clock."""

from __future__ import annotations

import pytest

from meshd.balance.window import Sample, Window


def test_a_key_never_sampled_moved_nothing() -> None:
    w = Window(keep=3)
    assert 7 not in w and w.newest(7) is None
    assert w.moved(7, 100.0, 5, 2) == (0, 0, 0.0)


def test_moved_is_the_totals_now_minus_the_oldest_sample() -> None:
    w = Window(keep=10)
    w.add(1, 10.0, 4, 1)
    w.add(1, 11.0, 9, 1)
    assert w.newest(1) == Sample(11.0, 9, 1)
    assert w.moved(1, 11.5, 12, 3) == (8, 2, 1.5)
    assert w.moved(1, 9.0, 4, 1) == (0, 0, 0.0)   # never a negative age


def test_keep_bounds_the_ring_by_count() -> None:
    w = Window(keep=3)
    for t in range(6):
        w.add(0, float(t), t * 10, t)
    # samples at 3, 4, 5 are left: the window is 2 to 3 samples long
    assert w.moved(0, 5.0, 50, 5) == (20, 2, 2.0)
    assert w.moved(0, 100.0, 50, 5) == (20, 2, 97.0)   # time alone drops nothing


def test_span_drops_a_sample_once_the_next_one_is_span_old() -> None:
    w = Window(span=10.0)
    for t in range(0, 15):
        w.add(0, float(t), t, 0)
    # at 14: the sample at 4 is 10 s old, so the one at 3 goes; 4 is the oldest kept
    assert w.moved(0, 14.0, 14, 0) == (10, 0, 10.0)
    # reading later expires too: at 30 only the newest sample (14) is left
    assert w.moved(0, 30.0, 14, 0) == (0, 0, 16.0)


def test_counters_that_went_back_move_by_zero() -> None:
    """A worker's stripe left the sum (its slot was reused): never a negative count."""
    w = Window(span=10.0)
    w.add(0, 0.0, 100, 20)
    assert w.moved(0, 1.0, 60, 5) == (0, 0, 1.0)


def test_keys_are_independent() -> None:
    w = Window(keep=2)
    w.add(1, 0.0, 1, 0)
    w.add(2, 5.0, 3, 3)
    assert w.moved(1, 6.0, 2, 0) == (1, 0, 6.0)
    assert w.moved(2, 6.0, 4, 4) == (1, 1, 1.0)


def test_a_window_keeps_at_least_one_sample() -> None:
    with pytest.raises(ValueError):
        Window(keep=0)
