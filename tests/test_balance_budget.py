"""The retry budget and retry backoff, with plain values and a fake clock."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.balance import budget
from meshd.balance.budget import Bucket, BucketCounter, RetryBudget


def test_allowed_is_ratio_of_requests_plus_a_floor() -> None:
    # 10 s window: a floor of 100 retries, plus 20 % of requests
    assert budget.allowed(0, 99)
    assert not budget.allowed(0, 100)
    assert budget.allowed(1000, 299)
    assert not budget.allowed(1000, 300)
    assert not budget.allowed(1000, 10, window_s=10, ratio=0.0, min_per_s=1.0)


def test_a_quiet_client_may_still_retry_at_the_floor() -> None:
    b = RetryBudget()
    assert sum(b.try_retry(0.5) for _ in range(150)) == 100


def test_requests_deposit_a_fifth_of_a_retry_each() -> None:
    b = RetryBudget(min_per_s=0.0)
    for _ in range(50):
        b.record_request(1.0)
    assert sum(b.try_retry(1.0) for _ in range(20)) == 10


def test_the_budget_refills_as_the_window_moves_on() -> None:
    b = RetryBudget()
    while b.try_retry(0.0):
        pass
    assert not b.can_retry(5.0)
    assert not b.can_retry(9.99)   # bucket 0 is still inside the window
    assert b.can_retry(10.0)       # bucket 0 left it
    assert b.counter.totals(10.0) == (0, 0)


@pytest.mark.parametrize("workers", [1, 4])
def test_retries_stay_within_twenty_percent_plus_ten_per_second(workers: int) -> None:
    """60 s at 200 req/s, every request failing and asking for one retry: retries stay
    within 20 % of requests + 10/s overall and in every 10 s window, and the budget is
    used, not starved. Several workers share it: each writes its own buckets and sums
    everybody's before deciding."""
    retries_per_second = [0] * 60
    requests_per_second = [0] * 60
    rng = random.Random(1)
    stripes = [BucketCounter() for _ in range(workers)]
    for n in range(60 * 200):
        now = n / 200
        mine = stripes[rng.randrange(workers)]
        mine.record_request(now)
        requests_per_second[int(now)] += 1
        shared = budget.window_totals(
            itertools.chain.from_iterable(s.buckets() for s in stripes), now)
        if budget.allowed(*shared):
            mine.record_retry(now)
            retries_per_second[int(now)] += 1
    total = sum(retries_per_second)
    assert total <= 0.2 * 12_000 + 10 * 60
    assert total >= 0.9 * (0.2 * 12_000 + 10 * 60)
    for start in range(0, 51):
        window = slice(start, start + 10)
        assert sum(retries_per_second[window]) <= \
            0.2 * sum(requests_per_second[window]) + 10 * 10


def test_window_totals_sum_several_writers_and_ignore_stale_buckets() -> None:
    a, b = BucketCounter(), BucketCounter()
    a.record_request(0.5, 10)
    a.record_request(12.5, 3)       # reuses slot 2: epoch 12 replaces nothing in window
    b.record_request(12.7, 4)
    b.record_retry(11.0)
    got = budget.window_totals(itertools.chain(a.buckets(), b.buckets()), 12.9)
    assert got == (7, 1)            # epoch 0 is outside [3, 12]
    assert budget.window_totals([Bucket()] * 10, 0.0) == (0, 0)  # a zeroed stripe...
    assert budget.window_totals([Bucket(0, 5, 1)], 0.0) == (5, 1)


def test_a_slot_is_reset_when_its_bucket_comes_round_again() -> None:
    c = BucketCounter()
    c.record_request(3.2, 5)
    c.record_request(13.4, 2)       # same slot, ten seconds on
    assert c.buckets()[3] == Bucket(13, 2, 0)
    assert c.totals(13.4) == (2, 0)
    with pytest.raises(ValueError):
        BucketCounter(buckets=0)


def test_backoff_bounds_follow_envoy() -> None:
    rng = random.Random(3)
    for attempt, ceiling in [(1, 0.025), (2, 0.075), (3, 0.175), (4, 0.25), (30, 0.25)]:
        values = [budget.backoff(attempt, rng) for _ in range(2000)]
        assert 0.0 <= min(values) and max(values) <= ceiling
        assert max(values) > 0.9 * ceiling          # the whole range is used
        assert sum(values) / len(values) == pytest.approx(ceiling / 2, rel=0.1)
    assert budget.backoff(0, rng) == 0.0


@given(st.integers(-3, 10_000), st.integers(0, 2**32))
def test_backoff_never_exceeds_the_cap(attempt: int, seed: int) -> None:
    assert 0.0 <= budget.backoff(attempt, random.Random(seed)) <= budget.BACKOFF_CAP
