"""The control process's own counters, kept in the shared-memory region so that a new
control process (the old one killed, or a reload's) continues them instead of starting
at 0 (see "Control counters" in ``meshd.shm``).

A counter is named by what /metrics prints before its value
(``meshd_discovery_errors_total{service="web",source="consul"}``): ``add`` counts under
that name in this process's slot table; ``value`` is the sum over every slot's table,
what every control process that ever ran under this master counted. Until ``bind``
(unit tests that build a runner without a region) and for a name whose table has no
room, counts stay in this process's memory and are added to the shared value.

One instance per control process: ``COUNTERS``, bound by ``meshd.control.process`` before
anything counts. A module-level object because the counting sites (discovery, fleet,
admin server, identity, tap) are built far apart and only need ``add``.
"""

from __future__ import annotations

import time

from meshd.shm import Region, counter_key

MAX_LOCAL = 4096   # names kept in memory (no region, or a full table): bounded too
TOTALS_TTL = 0.05  # one pass over the tables serves every series of one /metrics render


class Counters:
    def __init__(self) -> None:
        self.region: Region | None = None
        self.slot = -1
        self.local: dict[str, int] = {}
        self._keys: dict[str, int] = {}
        self._totals: dict[int, int] = {}
        self._totals_at = -1.0   # monotonic; -1: read the tables again

    def bind(self, region: Region, slot: int) -> None:
        """Count in ``region``'s table of ``slot`` from now on."""
        self.region = region
        self.slot = slot
        self.local = {}

    def _key(self, name: str) -> int:
        key = self._keys.get(name)
        if key is None:
            key = counter_key(name)
            if len(self._keys) < MAX_LOCAL:
                self._keys[name] = key
        return key

    def add(self, name: str, n: int = 1) -> None:
        region = self.region
        self._totals_at = -1.0   # this process's own counts show at once
        if region is not None and region.ctl_add(self.slot, self._key(name), n):
            return
        if name in self.local or len(self.local) < MAX_LOCAL:
            self.local[name] = self.local.get(name, 0) + n

    def value(self, name: str) -> int:
        region = self.region
        shared = 0
        if region is not None:
            now = time.monotonic()
            if self._totals_at < 0 or now - self._totals_at > TOTALS_TTL:
                self._totals = region.ctl_totals()
                self._totals_at = now
            shared = self._totals.get(self._key(name), 0)
        return shared + self.local.get(name, 0)


COUNTERS = Counters()


def labels(**pairs: str) -> str:
    """``{k="v",...}`` as /metrics prints it (values escaped), for a counter's name."""
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in pairs.items()) + "}"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
