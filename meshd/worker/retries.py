"""Retry decisions in a worker: what may be retried, and the budget all workers share.

The budget of a (listener, service) row is ``meshd.balance.budget.allowed`` over the
last 10 s of that row's requests and retries, summed over every live worker's stripe of
the metrics region: each worker counts its own requests (``F_REQUESTS``) and retries
(``F_RETRIES``), and samples the sums once a second (``sample_all``, from the worker's
heartbeat, for every row with traffic) to know what the window holds: a worker that
starts retrying late still sees the retries other workers made earlier in the window.
With every endpoint failing, retries stay within 20 % of requests plus 10/s for the
whole meshd, not per worker.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from meshd.balance import budget
from meshd.balance.retry import IDEMPOTENT_METHODS
from meshd.balance.window import Window
from meshd.shm import F_BUDGET_EXHAUSTED, F_REQUESTS, F_RETRIES, FIRST_ROW, Region, Stripe

IDEMPOTENT = frozenset(m.encode() for m in IDEMPOTENT_METHODS)  # RFC 9110 §9.2.2
SAMPLE_EVERY = 1.0


class RetryBudgets:
    def __init__(self, region: Region, stripe: Stripe, rng: random.Random | None = None) -> None:
        self.region = region
        self.stripe = stripe
        self.rng = rng or random.Random()
        self._window = Window(span=budget.WINDOW)  # per row: (time, requests, retries)
        self._boot_rows: int | None = None  # rows that existed when sampling began

    def set_groups(self, groups: Mapping[int, tuple[int, ...]]) -> None:
        """A service's row -> the rows of its authorities (``meshd.rowkeys``), from the
        snapshot: the budget is the service's, whatever authority its requests named."""
        self._groups = groups
        self._base = {r: base for base, rows in groups.items() for r in rows}

    _groups: Mapping[int, tuple[int, ...]] = {}
    _base: Mapping[int, int] = {}

    def _totals(self, row: int, live: list[int]) -> tuple[int, int]:
        requests = retries = 0
        for r in (row, *self._groups.get(row, ())):
            for slot in live:
                requests += self.region.read_field(slot, r, F_REQUESTS)
                retries += self.region.read_field(slot, r, F_RETRIES)
        return requests, retries

    def sample_all(self, rows: int, live: list[int], now: float) -> None:
        """Record every row's totals. The first call (at boot) takes every row as its
        base; a row that appears later was created with zero counts, so its base is
        zero (a window then holds all of its retries, even those made before this
        worker first looked)."""
        if self._boot_rows is None:
            self._boot_rows = rows
        for row in range(FIRST_ROW, rows):
            if row in self._base:  # an authority's row: counted with its service's
                continue
            requests, retries = self._totals(row, live)
            self._sample(row, now, requests, retries)

    def _sample(self, row: int, now: float, requests: int, retries: int) -> None:
        window = self._window
        if row not in window and self._boot_rows is not None and row >= self._boot_rows:
            window.add(row, now - SAMPLE_EVERY, 0, 0)
        newest = window.newest(row)
        if newest is None or now - newest.at >= SAMPLE_EVERY * 0.9:
            window.add(row, now, requests, retries)

    def try_retry(self, row: int, live: list[int], now: float) -> bool:
        """Spend one retry of ``row``'s budget if it allows one (counted either way); an
        authority's row spends its service's."""
        key = self._base.get(row, row)
        requests, retries = self._totals(key, live)
        self._sample(key, now, requests, retries)
        requests_in_window, retries_in_window, _ = self._window.moved(key, now, requests, retries)
        ok = budget.allowed(requests_in_window, retries_in_window)
        self.stripe.add(row, F_RETRIES if ok else F_BUDGET_EXHAUSTED)
        return ok

    def backoff(self, attempt: int) -> float:
        return budget.backoff(attempt, self.rng)
