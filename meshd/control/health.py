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
from datetime import UTC, datetime
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
from meshd.balance.window import Window
from meshd.control.rows import RowUsage
from meshd.discovery.api import Endpoint
from meshd.shm import EP_CONNS, KIND_WORKER, OFF_ROWS_EXHAUSTED, OFF_SLOTS_USED, Region

log = logging.getLogger("meshd.control")

TICK = 0.1
SAMPLE_EVERY = 1.0   # seconds between samples of an endpoint's outcome totals
SAMPLES = 10         # samples kept per endpoint: the recent window is 9 to 10 s long


class EndpointRows:
    """Endpoint address -> shm row, stable for the region's life (seeded on reload).

    An endpoint that finds the region full is counted in ``rows exhausted``
    (meshd_shm_rows_exhausted_total) once, and logged (the first few by name); usage,
    refused endpoints included, is published for the master's growth decision."""

    MAX_REFUSED = 1 << 16   # distinct refused endpoints remembered (churn must not grow it)
    LOGGED = 10             # refused endpoints named in the log; the rest are counted

    def __init__(self, region: Region, seed: Mapping[str, int] | None) -> None:
        self.region = region
        self.rows: dict[str, int] = dict(seed or {})
        self.next_row = max(self.rows.values(), default=-1) + 1
        self.refused: set[str] = set()
        self._usage = RowUsage(region, endpoint_rows=True)
        self._usage.publish(self.in_use)

    @property
    def in_use(self) -> int:
        """Rows the region needs now: assigned plus refused endpoints."""
        return self.next_row + len(self.refused)

    def ensure(self, endpoints: Sequence[Endpoint]) -> None:
        changed = False
        for e in endpoints:
            key = str(e)
            if key in self.rows:
                continue
            if self.next_row >= self.region.endpoint_rows:
                changed |= self._refuse(key)
                continue
            self.rows[key] = self.next_row
            self.next_row += 1
            changed = True
        if changed:
            self._usage.publish(self.in_use)

    def _refuse(self, key: str) -> bool:
        if key in self.refused or len(self.refused) >= self.MAX_REFUSED:
            return False
        self.refused.add(key)
        self.region.add_u64(OFF_ROWS_EXHAUSTED)
        if len(self.refused) <= self.LOGGED:
            log.error("shared memory full: no balancer row for endpoint %s (endpoint_rows = %d); "
                      "endpoints without a row are balanced by each worker alone until a reload "
                      "grows the region%s", key, self.region.endpoint_rows,
                      "; further ones are only counted in meshd_shm_rows_exhausted_total"
                      if len(self.refused) == self.LOGGED else "")
        return True


class HealthKeeper:
    def __init__(self, region: Region, rows: EndpointRows, rng: random.Random | None = None) -> None:
        self.region = region
        self.rows = rows
        self.rng = rng or random.Random()
        self.states: dict[int, EndpointHealth] = {}
        self.seen: dict[tuple[int, int], tuple[int, int]] = {}   # (slot, row) -> (ok, bad)
        self._next_prober = 0
        # Outcomes this process has counted per row, and a window of (time, ok, bad)
        # samples of them taken every SAMPLE_EVERY: the recent success rate in describe().
        self.totals: dict[int, tuple[int, int]] = {}
        self.window = Window(keep=SAMPLES)
        self._last_sample = float("-inf")
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
                if ok or bad:
                    t_ok, t_bad = self.totals.get(row, (0, 0))
                    if row not in self.window:  # a new row: its window starts here
                        self.window.add(row, now, t_ok, t_bad)
                    self.totals[row] = (t_ok + ok, t_bad + bad)
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
        if now - self._last_sample >= SAMPLE_EVERY:
            self._sample(now)

    def _sample(self, now: float) -> None:
        """One (time, ok, bad) sample of every row's totals (a row's first sample is taken
        before its first outcome is added, so its window has no gap)."""
        self._last_sample = now
        for row in self.rows.rows.values():
            ok, bad = self.totals.get(row, (0, 0))
            self.window.add(row, now, ok, bad)

    def recent(self, row: int, now: float) -> tuple[int, int, float]:
        """Successes and failures of a row over about the last 10 s, and that window's
        length in seconds (0.0 before the first sample)."""
        ok, bad = self.totals.get(row, (0, 0))
        return self.window.moved(row, now, ok, bad)

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

    def describe(self, endpoint: Endpoint, now: float, wall: float | None = None) -> dict[str, Any]:
        """``now``: monotonic; ``wall``: the same instant as wall-clock time (default: time.time())."""
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
        ejected = h.state is Health.EJECTED
        until = None
        if ejected:
            wall_until = (time.time() if wall is None else wall) + max(0.0, h.until - now)
            until = datetime.fromtimestamp(wall_until, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z")
        r_ok, r_bad, window = self.recent(row, now)
        requests = r_ok + r_bad
        return {
            "state": h.state.name.lower(),
            "in_flight": inflight,
            "connections": self.region.endpoint_view().field_sum(row, EP_CONNS, live),
            "ewma_ms": round(ewma.estimate(now) * 1000, 3) if ewma.observed else None,
            "successes": ok,
            "failures": bad,
            "consecutive_failures": h.failures,
            "ejections": h.ejections,
            "ejected_for_s": round(max(0.0, h.until - now), 3) if ejected else None,
            "ejected_until": until,
            "requests_10s": requests,
            "success_rate_10s": round(r_ok / requests, 4) if requests else None,
            "rps_10s": round(requests / window, 3) if window >= SAMPLE_EVERY else None,
        }
