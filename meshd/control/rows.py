"""Shared-memory row assignment: every (listener, row key) pair gets a stable row
(``meshd.rowkeys`` says what a key holds: service, mTLS peer, authority, or a route).

The control process owns the assignment and publishes it in every snapshot. It is
seeded from the previous generation's snapshot, so a reload keeps each pair on its row
and counters continue; rows are never reused within a region's life (a grown region is a
copy that keeps every row where it was).

How many rows are in use -- assigned, plus pairs that found the region full -- is
published in the region's header: the master reads it on the next reload to decide
whether the region grows, and the control warns once usage passes 3/4 (``RowUsage``,
which the endpoint rows of ``meshd.control.health`` publish through too).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from meshd import rowkeys
from meshd.shm import FIRST_ROW, OFF_ROWS_EXHAUSTED, Region, usage_high

if TYPE_CHECKING:
    from meshd.config import Config
    from meshd.ratelog import Throttle

log = logging.getLogger("meshd.control")


class RowUsage:
    """Publishes how many rows of one table -- the metric rows, or the endpoint rows --
    are in use, in the region's header field the master reads on reload, and warns once
    when usage passes 3/4 (``usage_high``): the region will grow at the next reload."""

    def __init__(self, region: Region, endpoint_rows: bool = False) -> None:
        self.region = region
        self.endpoint_rows = endpoint_rows
        self._high_logged = False

    def publish(self, in_use: int) -> None:
        region = self.region
        if self.endpoint_rows:
            region.publish_usage(endpoint_rows=in_use)
            capacity, kind = region.endpoint_rows, "endpoint"
        else:
            region.publish_usage(rows=in_use)
            capacity, kind = region.rows, "metric"
        if not self._high_logged and usage_high(in_use, capacity):
            self._high_logged = True
            log.warning("shared memory: %d of %d %s rows in use; the region will grow at "
                        "the next reload (HUP)", in_use, capacity, kind)


class RowTable:
    def __init__(self, region: Region, seed: Mapping[str, Mapping[str, int]] | None) -> None:
        self.region = region
        self.rows: dict[str, dict[str, int]] = {k: dict(v) for k, v in (seed or {}).items()}
        used = [r for by in self.rows.values() for r in by.values()]
        self.next_row = max(used, default=FIRST_ROW - 1) + 1
        self._warned: set[tuple[str, str]] = set()
        self._routes_warned: set[str] = set()   # listeners past MAX_ROUTE_ROWS, said once
        self._route_count: dict[str, int] = {}   # listener -> its route rows (_overflow aside)
        self._usage = RowUsage(region)
        self._usage.publish(self.in_use)

    @property
    def in_use(self) -> int:
        """Rows the region needs now: assigned (with rows 0 and 1) plus refused pairs."""
        return self.next_row + len(self._warned)

    def ensure(self, listener: str, service: str, optional: bool = False) -> bool:
        """A row for (listener, row key ``service``); False when there is none. An
        ``optional`` row (one of an authority: its requests have their service's row to
        count under) that finds the region full is refused quietly, not counted as
        exhausted: the Host is the client's to choose."""
        by = self.rows.setdefault(listener, {})
        if service in by:
            return True
        if self.next_row >= self.region.rows:
            if optional:
                return False
            if (listener, service) not in self._warned:
                self._warned.add((listener, service))
                self.region.add_u64(OFF_ROWS_EXHAUSTED)
                log.error("shared memory full: no metric row for listener %s service %s "
                          "(metric_rows = %d); its traffic is counted under service=\"_overflow\" "
                          "until a reload grows the region", listener, service, self.region.rows)
                self._usage.publish(self.in_use)
            return False
        by[service] = self.next_row
        self.next_row += 1
        self._usage.publish(self.in_use)
        return True

    def service_rows(self, service: str) -> list[int]:
        """Every row counting ``service``: its plaintext rows and its mTLS ones
        (``meshd.rowkeys``)."""
        prefix = service + rowkeys.SEP
        return [row for by in self.rows.values() for key, row in by.items()
                if key == service or key.startswith(prefix)]

    def routes(self, cfg: Config) -> None:
        """The rows of each ``[[route]]`` (``route_*`` metrics) on every HTTP outbound
        listener it applies to, up to ``rowkeys.MAX_ROUTE_ROWS`` per listener; one
        ``_overflow`` route row counts the rest."""
        for lst in cfg.listeners:
            if lst.direction != "outbound" or lst.protocol == "tcp":
                continue
            names = list(dict.fromkeys(r.name for r in cfg.routes
                                       if r.listener in (None, lst.name)
                                       and lst.service in (None, r.host)))
            if names:
                self._route_rows(lst.name, [rowkeys.route_key(name) for name in names])

    def fleet_routes(self, cfg: Config, service: str, names: list[str]) -> bool:
        """The rows of a config source's routes of ``service`` (their names: see
        ``meshd.rowkeys``) on every HTTP outbound listener that may route it, within the
        same cap as ``routes``; True when a row was added (to be published). Called
        whenever a service's effective routes change; rows stay for the region's life,
        also when the route goes away (they are seeded into the next generation)."""
        keys = [rowkeys.fleet_route_key(name, service)
                for name in dict.fromkeys(names) if rowkeys.fleet_route_name_ok(name)]
        added = False
        for lst in cfg.listeners:
            if (keys and lst.direction == "outbound" and lst.protocol != "tcp"
                    and lst.service in (None, service)):
                added = self._route_rows(lst.name, keys) or added
        return added

    def _route_rows(self, listener: str, keys: list[str]) -> bool:
        """Rows for route ``keys`` of ``listener`` and its ``_overflow`` route row, up to
        ``rowkeys.MAX_ROUTE_ROWS`` route rows; True when a row was added."""
        by_key = self.rows.get(listener, {})
        if all(k in by_key for k in keys):
            return False
        added = rowkeys.OVERFLOW_KEY not in by_key and self.ensure(listener, rowkeys.OVERFLOW_KEY)
        by_key = self.rows[listener]
        have = self._route_count.get(listener)
        if have is None:   # counted once (seeded rows included), then kept up to date
            have = sum(1 for k in by_key if k.startswith(rowkeys.ROUTE)) - 1  # _overflow
        for key in keys:
            if key in by_key:
                continue
            if have >= rowkeys.MAX_ROUTE_ROWS:
                if listener not in self._routes_warned:
                    self._routes_warned.add(listener)
                    log.warning("listener %s: %d routes have metric rows; the others count "
                                'under route="%s"', listener, rowkeys.MAX_ROUTE_ROWS,
                                rowkeys.OVERFLOW)
                break
            if self.ensure(listener, key):
                have += 1
                added = True
        self._route_count[listener] = have
        return added

    def authority(self, listener: str, base_key: str, authority: str,
                  throttle: Throttle) -> bool:
        """A row for the requests of ``base_key``'s row of ``listener`` that name
        ``authority``, up to ``rowkeys.MAX_AUTHORITY_ROWS`` per listener (the rest stay
        under authority="_other"). Only for a base key that has a row already (a worker
        cannot make rows for made-up services) and a valid authority; refused quietly
        when the region is full. True when a row was added."""
        by_key = self.rows.get(listener)
        if (not by_key or base_key not in by_key or base_key.startswith(rowkeys.ROUTE)
                or rowkeys.parts(base_key).authority
                or rowkeys.authority_of(authority.encode("latin-1", "replace")) != authority):
            return False
        row_key = rowkeys.with_authority(base_key, authority)
        if row_key in by_key:
            return False
        have = sum(1 for k in by_key if rowkeys.parts(k).authority)
        if have >= rowkeys.MAX_AUTHORITY_ROWS:
            throttle.info(f"{listener}: authority rows", "listener %s: %d authorities have "
                          'their own metric rows; more count under authority="%s"',
                          listener, have, rowkeys.NO_AUTHORITY)
            return False
        return self.ensure(listener, row_key, optional=True)
