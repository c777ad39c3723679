"""Sliding windows over cumulative counters: how far a pair of ever-growing totals
(successes and failures, requests and retries) moved over about the last N seconds.

Counters that only grow (a shared-memory row's, summed over the workers' stripes) need no
buckets to be windowed: the caller samples their totals now and then (``add``), and what
moved within the window is the totals now minus the oldest sample kept (``moved``). Each
key (a shared-memory row) has its own ring of ``Sample(at, first, second)``, bounded one
of two ways:

- ``keep``: at most that many samples (the oldest is dropped as a new one arrives), so
  samples ``every`` seconds apart cover ``(keep - 1) x every`` to ``keep x every``;
- ``span``: a sample is dropped once the one after it is ``span`` seconds old, so the
  oldest kept covers at least ``span`` whenever the history reaches that far back.

How often to sample is the caller's: one clock for every key, or each key on its own.
"""

from __future__ import annotations

import math
from collections import deque
from typing import NamedTuple


class Sample(NamedTuple):
    """The two totals of a key at time ``at``."""

    at: float
    first: int
    second: int


class Window:
    """Per-key rings of samples of two cumulative counters (see the module docstring)."""

    def __init__(self, keep: int | None = None, span: float = math.inf) -> None:
        if keep is not None and keep < 1:
            raise ValueError("a window keeps at least one sample")
        self.keep = keep
        self.span = span
        self._rings: dict[int, deque[Sample]] = {}

    def __contains__(self, key: int) -> bool:
        return key in self._rings

    def newest(self, key: int) -> Sample | None:
        ring = self._rings.get(key)
        return ring[-1] if ring else None

    def add(self, key: int, at: float, first: int, second: int) -> None:
        ring = self._rings.get(key)
        if ring is None:
            ring = self._rings[key] = deque(maxlen=self.keep)
        ring.append(Sample(at, first, second))
        self._expire(ring, at)

    def moved(self, key: int, now: float, first: int, second: int) -> tuple[int, int, float]:
        """How far the totals ``first`` and ``second`` (as they are at ``now``) moved since
        the oldest sample of ``key``, never below zero, and that sample's age in seconds;
        (0, 0, 0.0) for a key never sampled."""
        ring = self._rings.get(key)
        if not ring:
            return 0, 0, 0.0
        self._expire(ring, now)
        oldest = ring[0]
        return (max(first - oldest.first, 0), max(second - oldest.second, 0),
                max(0.0, now - oldest.at))

    def _expire(self, ring: deque[Sample], now: float) -> None:
        while len(ring) > 1 and now - ring[1].at >= self.span:
            ring.popleft()
