"""Failure accrual, owned by the control process: the one writer of the health rows.

Every endpoint address gets a stable row of the endpoint section of shared memory
(``EndpointRows``). Workers count each request's outcome in their own stripe; every
TICK the control process reads how the live workers' success and failure counters moved
and drives ``meshd.balance.ejection``'s state machine: consecutive failures (no success
in between) reaching the service's ``failure_accrual`` eject the endpoint, unless that
would eject more than half of a service's endpoints; after the jittered backoff one
worker slot is granted a single probe request; its outcome returns the endpoint or
ejects it again for twice as long. Workers read only the state field on the hot path.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

from meshd.balance.ejection import (
    EjectionPolicy,
    EndpointHealth,
    Health,
    grant_probe,
    may_eject,
    on_failure,
    on_success,
    on_tick,
)
from meshd.balance.ewma import EwmaState, combine
from meshd.discovery.api import Endpoint
from meshd.shm import KIND_WORKER, OFF_SLOTS_USED, Region

log = logging.getLogger("meshd.control")

TICK = 0.1


class EndpointRows:
    """Endpoint address -> shm row, stable for the region's life (seeded on reload)."""

    def __init__(self, region: Region, seed: Mapping[str, int] | None) -> None:
        self.region = region
        self.rows: dict[str, int] = dict(seed or {})
        self.next_row = max(self.rows.values(), default=-1) + 1
        self.exhausted_logged = False

    def ensure(self, endpoints: Sequence[Endpoint]) -> None:
        for e in endpoints:
            key = str(e)
            if key in self.rows:
                continue
            if self.next_row >= self.region.endpoint_rows:
                if not self.exhausted_logged:
                    self.exhausted_logged = True
                    log.error("shared memory full: no balancer row for endpoint %s "
                              "(endpoint_rows = %d); endpoints without a row are balanced "
                              "by each worker alone", key, self.region.endpoint_rows)
                continue
            self.rows[key] = self.next_row
            self.next_row += 1


class HealthKeeper:
    def __init__(self, region: Region, rows: EndpointRows, rng: random.Random | None = None) -> None:
        self.region = region
        self.rows = rows
        self.rng = rng or random.Random()
        self.states: dict[int, EndpointHealth] = {}
        self.seen: dict[tuple[int, int], tuple[int, int]] = {}   # (slot, row) -> (ok, bad)
        self._next_prober = 0
        self._take_baseline()

    def _take_baseline(self) -> None:
        """Outcomes counted before this process started (a reload, a restart of the
        control process) are history: start from what every stripe holds now, for the
        rows the previous generation assigned. Anything else starts from zero."""
        for row in self.rows.rows.values():
            for slot in range(self.region.get_u32(OFF_SLOTS_USED)):
                _, _, _, s, f = self.region.ep_read(slot, row)
                if s or f:
                    self.seen[(slot, row)] = (s, f)

    def live_workers(self) -> list[int]:
        return [s.index for s in self.region.slots_in_use() if s.kind == KIND_WORKER and s.pid > 0]

    def tick(self, services: Mapping[str, tuple[tuple[Endpoint, ...], int]], now: float) -> None:
        """``services``: name -> (endpoints, failure_accrual). One pass of the state machine."""
        live = self.live_workers()
        for endpoints, accrual in services.values():
            rows = [self.rows.rows.get(str(e), -1) for e in endpoints]
            rows = [r for r in rows if r >= 0]
            if not rows:
                continue
            policy = EjectionPolicy(failures=accrual or 1 << 30)
            states = [self.states.get(r, EndpointHealth()) for r in rows]
            for i, row in enumerate(rows):
                ok, bad = self._moved(row, live)
                h = before = states[i]
                if ok:
                    h = on_success(h, now, policy)
                if bad and not (ok and h.state is Health.HEALTHY):
                    for _ in range(bad):
                        h = on_failure(h, now, policy, self.rng, may_eject(states, i, policy))
                        states[i] = h
                h = on_tick(h, now, policy)
                if h.state is Health.EJECTED and live:
                    prober = live[self._next_prober % len(live)]
                    granted = grant_probe(h, now, prober, policy)
                    if granted is not None:
                        self._next_prober += 1
                        h = granted
                states[i] = h
                if h != before:
                    self._store(row, h, before)

    def _moved(self, row: int, live: list[int]) -> tuple[int, int]:
        """Successes and failures since the last tick, over the live workers' stripes."""
        ok = bad = 0
        for slot in live:
            _, _, _, s, f = self.region.ep_read(slot, row)
            s0, f0 = self.seen.get((slot, row), (0, 0))
            if s < s0 or f < f0:  # a slot reused after a region change: start over
                s0, f0 = s, f
            ok += s - s0
            bad += f - f0
            self.seen[(slot, row)] = (s, f)
        return ok, bad

    def _store(self, row: int, h: EndpointHealth, before: EndpointHealth) -> None:
        self.states[row] = h
        self.region.set_health(row, tuple(float(v) for v in h.as_row()))
        if h.state is not before.state:
            address = next((a for a, r in self.rows.rows.items() if r == row), f"row {row}")
            if h.state is Health.EJECTED:
                log.warning("endpoint %s ejected for %.1fs (ejection %d)", address,
                            max(0.0, h.until - time.monotonic()), h.ejections)
            elif h.state is Health.HEALTHY:
                log.info("endpoint %s is back", address)

    def describe(self, endpoint: Endpoint, now: float) -> dict[str, Any]:
        row = self.rows.rows.get(str(endpoint))
        if row is None:
            return {"row": None}
        live = self.live_workers()
        inflight = ok = bad = 0
        states = []
        for slot in range(self.region.get_u32(OFF_SLOTS_USED)):
            n, rtt, stamp, s, f = self.region.ep_read(slot, row)
            ok += s
            bad += f
            if slot in live:
                inflight += n
                states.append(EwmaState(rtt, stamp))
        ewma = combine(states, now)
        h = self.states.get(row, EndpointHealth())
        return {
            "state": h.state.name.lower(),
            "in_flight": inflight,
            "ewma_ms": round(ewma.estimate(now) * 1000, 3) if ewma.observed else None,
            "successes": ok,
            "failures": bad,
            "consecutive_failures": h.failures,
            "ejections": h.ejections,
            "ejected_for_s": round(max(0.0, h.until - now), 3) if h.state is Health.EJECTED else None,
        }
