"""Retry decisions in a worker: what may be retried, and the budget all workers share.

The budget of a (listener, service) row is ``meshd.balance.budget.allowed`` over the
last 10 s of that row's requests and retries, summed over every live worker's stripe of
the metrics region: each worker counts its own requests (``F_REQUESTS``) and retries
(``F_RETRIES``), and samples the sums about once a second to know what the window
holds. With every endpoint failing, retries stay within 20 % of requests plus 10/s for
the whole meshd, not per worker.
"""

from __future__ import annotations

import random
from collections import deque

from meshd.balance import budget
from meshd.balance.retry import IDEMPOTENT_METHODS
from meshd.shm import F_BUDGET_EXHAUSTED, F_REQUESTS, F_RETRIES, Region, Stripe

_METHODS = frozenset(m.encode() for m in IDEMPOTENT_METHODS)
SAMPLE_EVERY = 1.0


def replayable(method: bytes, has_body: bool) -> bool:
    """Idempotent and bodiless: it can be sent again as it was (bodies are not buffered
    for replay yet, so a request with a body is never retried)."""
    return method in _METHODS and not has_body


class RetryBudgets:
    def __init__(self, region: Region, stripe: Stripe, rng: random.Random | None = None) -> None:
        self.region = region
        self.stripe = stripe
        self.rng = rng or random.Random()
        self._samples: dict[int, deque[tuple[float, int, int]]] = {}

    def _totals(self, row: int, live: list[int]) -> tuple[int, int]:
        requests = retries = 0
        for slot in live:
            requests += self.region.read_field(slot, row, F_REQUESTS)
            retries += self.region.read_field(slot, row, F_RETRIES)
        return requests, retries

    def try_retry(self, row: int, live: list[int], now: float) -> bool:
        """Spend one retry of ``row``'s budget if it allows one (counted either way)."""
        requests, retries = self._totals(row, live)
        samples = self._samples.setdefault(row, deque())
        if not samples or now - samples[-1][0] >= SAMPLE_EVERY:
            samples.append((now, requests, retries))
        while len(samples) > 1 and now - samples[1][0] >= budget.WINDOW:
            samples.popleft()
        _, base_requests, base_retries = samples[0]
        ok = budget.allowed(max(requests - base_requests, 0), max(retries - base_retries, 0))
        self.stripe.add(row, F_RETRIES if ok else F_BUDGET_EXHAUSTED)
        return ok

    def backoff(self, attempt: int) -> float:
        return budget.backoff(attempt, self.rng)
