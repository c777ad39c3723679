"""Recent errors: a small bounded ring of the failures the control process can see, for
the dashboard (admin ``/status``, ``recent_errors``).

The control process does not see requests, only counters; so an entry is a *change* it
noticed between two looks (every stats sample, about once a second):

- ``response``: a service's rows counted failed responses: one entry per 5xx status
  (``detail`` "503"), and ``failure`` for failures without a 5xx (a gRPC status other
  than 0 in a 200, a reset stream), with how many;
- ``ejection``: failure accrual ejected an endpoint (``detail`` its address);
- ``discovery``: a source's watch of a service failed (``detail`` its error);
- ``reload``: a config reload (HUP) failed; this generation runs on (the master logged why).

An entry of the same kind, service and detail as one the ring holds is merged into it
(``count`` grows, ``last`` moves), so a service failing for a minute is one entry, not
sixty, and a service alternating 502 and 503 two. The ring holds RING entries; when a new
one comes, the one that happened least recently goes. The maps of last-seen counters are
bounded by the region's rows and the discovery watches. A reload starts a new control
process, with an empty ring.

The counters of reload failures seen since this process started also tell the live
check whether the *last* reload failed: a reload that succeeds starts a new control
process, so any failure this one sees came after the configuration it runs.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshd.balance.ejection import Health
from meshd.shm import (
    F_CLASS,
    F_FAILURES,
    F_STATUS,
    OFF_RELOAD_FAILURES,
    STATUS_CLASSES,
    STATUS_CODES,
)

RING = 64   # entries kept; the dashboard shows the newest few
DETAIL_MAX = 200   # characters of a detail (a source's error text can be long)

_5XX = [F_STATUS + i for i, code in enumerate(STATUS_CODES) if code >= 500]
_5XX_CODES = [str(code) for code in STATUS_CODES if code >= 500]
_5XX_CLASS = F_CLASS + STATUS_CLASSES.index("5xx")


@dataclass(slots=True)
class Entry:
    kind: str
    service: str
    detail: str
    count: int
    first: float   # unix time
    last: float

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "service": self.service, "detail": self.detail,
                "count": self.count, "first": _iso(self.first), "last": _iso(self.last)}


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class RecentErrors:
    def __init__(self, reload_failures: int, size: int = RING) -> None:
        """``reload_failures``: the region's reload failure counter when this control
        process started."""
        self.size = size
        # (kind, service, detail) -> entry, the one that happened last at the end
        self.ring: OrderedDict[tuple[str, str, str], Entry] = OrderedDict()
        self._rows: dict[int, tuple[int, ...]] = {}         # row -> last failure counters
        self._ejections: dict[int, int] = {}                # endpoint row -> ejections
        self._source_errors: dict[tuple[str, str], int] = {}  # (service, source) -> errors_total
        self.reload_base = reload_failures
        self._reload_seen = reload_failures

    def add(self, kind: str, service: str, detail: str, count: int = 1,
            at: float | None = None) -> None:
        at = time.time() if at is None else at
        detail = detail[:DETAIL_MAX]
        key = (kind, service, detail)
        e = self.ring.get(key)
        if e is not None:
            e.count += count
            e.last = max(e.last, at)
            self.ring.move_to_end(key)
            return
        self.ring[key] = Entry(kind, service, detail, count, at, at)
        if len(self.ring) > self.size:
            self.ring.popitem(last=False)

    def entries(self) -> list[dict[str, Any]]:
        """Newest first (by when they last happened)."""
        return [e.as_json() for e in sorted(self.ring.values(), key=lambda e: e.last,
                                                reverse=True)]

    # -- what the control process looks at -----------------------------------------------

    def responses(self, totals: Mapping[int, Sequence[int]], services: Mapping[int, str],
                  at: float | None = None) -> None:
        """``totals``: row -> its counters (a stats sample); ``services``: row -> service.
        A row seen for the first time is only remembered: what it counted before is not
        recent."""
        for row, t in totals.items():
            now = (*(t[f] for f in _5XX), t[_5XX_CLASS], t[F_FAILURES])
            old = self._rows.get(row)
            self._rows[row] = now
            service = services.get(row)
            if old is None or service is None or now == old:
                continue
            d = [a - b for a, b in zip(now, old, strict=True)]
            if any(x < 0 for x in d):
                continue   # a row reused after the region grew: start over
            for code, n in zip(_5XX_CODES, d, strict=False):
                if n:
                    self.add("response", service, code, n, at)
            if d[-2]:
                self.add("response", service, "5xx (other)", d[-2], at)
            other = d[-1] - sum(d[:-1])
            if other > 0:
                self.add("response", service, "failure (no 5xx: gRPC status, reset)", other, at)

    def ejections(self, endpoints: Iterable[tuple[str, str, int, Any]],
                  at: float | None = None) -> None:
        """``endpoints``: (service, address, endpoint row, EndpointHealth)."""
        for service, address, row, health in endpoints:
            old = self._ejections.get(row)
            self._ejections[row] = health.ejections
            if old is not None and health.ejections > old:
                state = "ejected" if health.state is Health.EJECTED else "ejected, now probing"
                self.add("ejection", service, f"{address} {state}", health.ejections - old, at)

    def sources(self, watches: Iterable[tuple[str, str, int, str | None]],
                at: float | None = None) -> None:
        """``watches``: (service, source, errors_total, last error)."""
        seen: dict[tuple[str, str], int] = {}   # only watches there are now: bounded
        for service, source, errors_total, error in watches:
            key = (service, source)
            seen[key] = errors_total
            old = self._source_errors.get(key, 0)
            if errors_total > old:
                self.add("discovery", service, f"source {source}: {error or 'failed'}",
                         errors_total - old, at)
        self._source_errors = seen

    def reloads(self, failures_total: int, at: float | None = None) -> None:
        if failures_total > self._reload_seen:
            self.add("reload", "", "config reload failed; this generation runs on (see the log)",
                     failures_total - self._reload_seen, at)
        self._reload_seen = max(self._reload_seen, failures_total)


def observe(recent: RecentErrors, region: Any, totals: Mapping[int, Sequence[int]],
            services: Mapping[int, str], discovery: Any) -> None:
    """One look at everything the ring follows (the control process's stats loop)."""
    at = time.time()
    recent.responses(totals, services, at)
    rows = discovery.endpoint_rows.rows
    states = discovery.health.states
    eps = []
    errs = []
    for name, w in discovery.watches.items():
        for e in w.merged():
            row = rows.get(str(e))
            if row is not None and row in states:
                eps.append((name, str(e), row, states[row]))
        for src, st in w.sources.items():
            errs.append((name, src, st.errors_total, st.error))
    recent.ejections(eps, at)
    recent.sources(errs, at)
    recent.reloads(region.get_u64(OFF_RELOAD_FAILURES), at)
