"""The retry budget of a service, and the backoff before a retry.

Budget, as Finagle's ``RetryBudget`` and linkerd2-proxy's (tower's ``TpsBudget``) define
it: every original request deposits ``ratio`` of a retry (20 %), a reserve of
``min_per_s`` retries per second (10) lets a quiet client retry at all, and both expire
after ``window_s`` (10 s). A retry may go when it fits::

    retries_in_window + 1 <= ratio x requests_in_window + min_per_s x window_s

So with every request failing, retries stay within 20 % of requests plus 10 per second:
retries cannot amplify an outage by more than that. Retries do not deposit.

Cross-worker form: the budget is per service and shared by all workers, so its state is
plain counters per time bucket. Time is cut into ``buckets`` buckets of
``window_s / buckets`` seconds (1 s by default); bucket ``epoch = floor(now / width)``
lives in slot ``epoch % buckets``, as ``Bucket(epoch, requests, retries)``: three
integers, so a worker can keep its own ring of buckets in its shared-memory stripe (single
writer), and a reader sums every worker's buckets whose epoch is inside the window
(``window_totals``) and asks ``allowed``. ``now`` is CLOCK_MONOTONIC, which is system-wide,
so every worker agrees on the epochs. The window is the current bucket plus the
``buckets - 1`` before it (between 9 and 10 s of history by default).

Backoff: Envoy's jittered exponential retry backoff (AWS's "full jitter"): retry number
``n`` waits a uniform random time in ``[0, min(cap, base x (2^n - 1))]``, base 25 ms,
cap 250 ms.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from typing import NamedTuple

RATIO = 0.2          # retries per original request
MIN_PER_S = 10.0     # retries per second always allowed
WINDOW = 10.0        # seconds
BUCKETS = 10
BACKOFF_BASE = 0.025  # seconds
BACKOFF_CAP = 0.25    # seconds


def allowed(requests_in_window: int, retries_in_window: int, window_s: float = WINDOW,
            ratio: float = RATIO, min_per_s: float = MIN_PER_S) -> bool:
    """May one more retry go, given the window's original requests and retries so far?"""
    return retries_in_window + 1 <= ratio * requests_in_window + min_per_s * window_s


class Bucket(NamedTuple):
    """Counts of one time bucket, ``epoch`` = floor(time / bucket width)."""

    epoch: int = -1
    requests: int = 0
    retries: int = 0


def bucket_epoch(now: float, width: float) -> int:
    return math.floor(now / width)


def window_totals(buckets: Iterable[Bucket], now: float, window_s: float = WINDOW,
                  n_buckets: int = BUCKETS) -> tuple[int, int]:
    """(requests, retries) over the buckets inside the window ending at ``now``, from any
    number of writers' buckets (stale and empty slots are ignored by their epoch)."""
    current = bucket_epoch(now, window_s / n_buckets)
    oldest = current - n_buckets + 1
    requests = retries = 0
    for b in buckets:
        if oldest <= b.epoch <= current:
            requests += b.requests
            retries += b.retries
    return requests, retries


class BucketCounter:
    """One writer's ring of buckets (a single process, or one worker's stripe)."""

    def __init__(self, window_s: float = WINDOW, buckets: int = BUCKETS) -> None:
        if buckets < 1 or window_s <= 0:
            raise ValueError("need at least one bucket and a positive window")
        self.window_s = window_s
        self.n_buckets = buckets
        self.width = window_s / buckets
        self._ring = [Bucket()] * buckets

    def _add(self, now: float, requests: int, retries: int) -> None:
        epoch = bucket_epoch(now, self.width)
        slot = epoch % self.n_buckets
        b = self._ring[slot]
        if b.epoch != epoch:  # a new bucket: the slot's old counts left the window
            b = Bucket(epoch, 0, 0)
        self._ring[slot] = Bucket(epoch, b.requests + requests, b.retries + retries)

    def record_request(self, now: float, n: int = 1) -> None:
        self._add(now, n, 0)

    def record_retry(self, now: float, n: int = 1) -> None:
        self._add(now, 0, n)

    def buckets(self) -> tuple[Bucket, ...]:
        """The ring as it would be stored: slot ``i`` holds an epoch = i mod buckets."""
        return tuple(self._ring)

    def totals(self, now: float) -> tuple[int, int]:
        return window_totals(self._ring, now, self.window_s, self.n_buckets)


class RetryBudget:
    """A budget for one service in one process: ``record_request`` for each original
    request, ``can_retry`` before a retry and ``record_retry`` when it goes (or
    ``try_retry``, which does both)."""

    def __init__(self, ratio: float = RATIO, min_per_s: float = MIN_PER_S,
                 window_s: float = WINDOW, buckets: int = BUCKETS) -> None:
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.counter = BucketCounter(window_s, buckets)

    def record_request(self, now: float) -> None:
        self.counter.record_request(now)

    def record_retry(self, now: float) -> None:
        self.counter.record_retry(now)

    def can_retry(self, now: float) -> bool:
        requests, retries = self.counter.totals(now)
        return allowed(requests, retries, self.counter.window_s, self.ratio, self.min_per_s)

    def try_retry(self, now: float) -> bool:
        if not self.can_retry(now):
            return False
        self.record_retry(now)
        return True


def backoff(attempt: int, rng: random.Random, base: float = BACKOFF_BASE,
            cap: float = BACKOFF_CAP) -> float:
    """Seconds to wait before retry number ``attempt`` (1 for the first retry)."""
    if attempt < 1:
        return 0.0
    ceiling = min(cap, base * (2.0 ** min(attempt, 62) - 1.0))
    return rng.uniform(0.0, ceiling)
