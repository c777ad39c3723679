"""Running discovery in the control process and publishing snapshots to workers.

One watch greenlet per service. Each applies its backend's updates to the service's
endpoint set; a publisher greenlet coalesces changes and writes a new snapshot at most
every PUBLISH_INTERVAL. A watch that fails keeps the endpoints it last had (fail static)
and is restarted with jittered backoff. ``RowTable`` gives every (listener, service)
pair a stable shared-memory row, seeded from the previous generation's snapshot so
counters continue across reloads.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping

import gevent
import gevent.event

from meshd.config import Config
from meshd.discovery.api import Endpoint, NoSuchService, Update, apply
from meshd.discovery.registry import load as load_plugin
from meshd.errors import ConfigError, MeshdError
from meshd.shm import FIRST_ROW, OFF_ROWS_EXHAUSTED, Region
from meshd.snapshot import Snapshot, write_atomic

log = logging.getLogger("meshd.control")

PUBLISH_INTERVAL = 0.05
FIRST_SYNC_WAIT = 5.0
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0


class RowTable:
    """(listener, service) -> shm row. Rows are never reused within a region's life."""

    def __init__(self, region: Region, seed: Mapping[str, Mapping[str, int]] | None) -> None:
        self.region = region
        self.rows: dict[str, dict[str, int]] = {k: dict(v) for k, v in (seed or {}).items()}
        used = [r for by in self.rows.values() for r in by.values()]
        self.next_row = max(used, default=FIRST_ROW - 1) + 1
        self._warned: set[tuple[str, str]] = set()

    def ensure(self, listener: str, service: str) -> None:
        by = self.rows.setdefault(listener, {})
        if service in by:
            return
        if self.next_row >= self.region.rows:
            if (listener, service) not in self._warned:
                self._warned.add((listener, service))
                self.region.add_u64(OFF_ROWS_EXHAUSTED)
                log.error("shared memory full: no metric row for listener %s service %s "
                          "(metric_rows = %d); its traffic is counted under service=\"_overflow\"",
                          listener, service, self.region.rows)
            return
        by[service] = self.next_row
        self.next_row += 1


class DiscoveryRunner:
    def __init__(self, cfg: Config, region: Region, generation: int, path: str,
                 previous: Snapshot | None) -> None:
        self.cfg = cfg
        self.generation = generation
        self.path = path
        self.rows = RowTable(region, previous.rows if previous else None)
        self.backends: dict[str, object] = {}
        self.source_errors: dict[str, str] = {}
        self.endpoints: dict[str, tuple[Endpoint, ...]] = {}
        self.exists: dict[str, bool] = {}
        self.synced: set[str] = set()
        self.watch_errors: dict[str, str] = {}
        self.watching: dict[str, str] = {}     # service -> source name
        self.seq = 0
        self.dirty = gevent.event.Event()
        self.first_published = gevent.event.Event()

    def start(self) -> None:
        self._load_backends()
        for service in self._wanted_services():
            self._watch(service)
        for lst in self.cfg.listeners:
            self.rows.ensure(lst.name, "")
            if lst.direction == "inbound":
                assert lst.forward is not None
                self.rows.ensure(lst.name, str(lst.forward))
            elif lst.protocol == "tcp" and lst.service:
                self.rows.ensure(lst.name, lst.service)
        gevent.spawn(self._publisher)

    def _load_backends(self) -> None:
        for src in self.cfg.discovery:
            try:
                cls, info = load_plugin(src.plugin)
                self.backends[src.name] = cls(src.name, src.options)
            except ConfigError as e:
                msg = "; ".join(f"discovery.{src.name}.{k}: {m}" for k, m in e.problems)
                self.source_errors[src.name] = msg
                log.error("discovery source %s: %s", src.name, msg)
            except MeshdError as e:
                self.source_errors[src.name] = str(e)
                log.error("discovery source %s: %s", src.name, e)

    def _wanted_services(self) -> dict[str, str]:
        wanted: dict[str, str] = {}
        for name, backend in self.backends.items():
            try:
                for service in backend.services():  # type: ignore[attr-defined]
                    wanted.setdefault(service, name)
            except Exception as e:
                log.error("discovery source %s: services() failed: %s", name, e)
        first = self.cfg.discovery[0].name if self.cfg.discovery else None
        for service, svc in self.cfg.services.items():
            source = svc.discovery or wanted.get(service) or first
            if source is not None:
                wanted[service] = source
        for lst in self.cfg.listeners:
            if lst.protocol == "tcp" and lst.service and lst.service not in wanted and first:
                wanted[lst.service] = first
        return wanted

    def _watch(self, service: str) -> None:
        source = self._wanted_services().get(service) if service not in self.watching else None
        if source is None:
            return
        self.watching[service] = source
        for lst in self.cfg.listeners:
            if lst.direction == "outbound" and lst.protocol != "tcp":
                self.rows.ensure(lst.name, service)
        backend = self.backends.get(source)
        if backend is None:
            self.watch_errors[service] = self.source_errors.get(source, f"no source {source}")
            self.synced.add(service)
            return
        gevent.spawn(self._watch_loop, service, source, backend)

    def _watch_loop(self, service: str, source: str, backend: object) -> None:
        failures = 0
        while True:
            try:
                for update in backend.watch(service):  # type: ignore[attr-defined]
                    self._apply(service, update)
                    failures = 0
                log.warning("discovery %s: watch of %s ended; restarting", source, service)
            except Exception as e:
                failures += 1
                self.watch_errors[service] = f"{type(e).__name__}: {e}"
                log.error("discovery %s (plugin %s): watch of %s failed: %s; keeping the last "
                          "%d endpoints", source, type(backend).__module__, service, e,
                          len(self.endpoints.get(service, ())))
                self.synced.add(service)
                self.dirty.set()
            delay = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(failures, 10))
            gevent.sleep(delay * random.uniform(0.5, 1.0))

    def _apply(self, service: str, update: Update) -> None:
        if isinstance(update, NoSuchService):
            self.exists[service] = False
            self.endpoints.pop(service, None)
        else:
            self.exists[service] = True
            self.endpoints[service] = apply(self.endpoints.get(service, ()), update)
        self.watch_errors.pop(service, None)
        self.synced.add(service)
        self.dirty.set()

    @property
    def all_synced(self) -> bool:
        return all(s in self.synced for s in self.watching)

    def _publisher(self) -> None:
        started = time.monotonic()
        while not self.all_synced and time.monotonic() - started < FIRST_SYNC_WAIT:
            self.dirty.wait(0.05)
            self.dirty.clear()
        while True:
            self._publish()
            self.first_published.set()
            self.dirty.wait()
            self.dirty.clear()
            gevent.sleep(PUBLISH_INTERVAL)

    def snapshot(self) -> Snapshot:
        return Snapshot(
            generation=self.generation,
            seq=self.seq,
            services=dict(self.endpoints),
            rows=self.rows.rows,
            synced=self.all_synced,
            errors=dict(self.watch_errors),
        )

    def _publish(self) -> None:
        self.seq += 1
        write_atomic(self.path, self.snapshot().encode())

    def close(self) -> None:
        for backend in self.backends.values():
            try:
                backend.close()  # type: ignore[attr-defined]
            except Exception as e:
                log.warning("closing discovery backend: %s", e)
