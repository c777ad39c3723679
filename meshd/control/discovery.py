"""Running discovery in the control process and publishing snapshots to workers.

One watch greenlet per (service, source). A service is watched when the config names it
(`[service.NAME]`, a tcp listener's `service`), when a source lists it up front, or when
a worker first asks for it (a datagram on the control socket); a service watched on
demand is dropped again after ``service_idle_expiry`` without requests.

Clients choose the names asked for (a Host header), so on-demand watches are bounded:
each source holds at most its ``max_watches``; a new name past that stops the least
recently used watch of a name no source knows (``Backend.knows``, optional) and whose
watch found nothing, so made-up names never lock out a real service, which is never
refused. A watch that found no such service, or only failed, is dropped
``discovery_negative_ttl`` after it started. The log lines clients can cause this way
are rate limited (``meshd.ratelog``).

Updates from each source are applied to that source's endpoint set; a service served by
several sources with shares (a migration: 90 % Consul, 10 % Kubernetes) gets their
endpoints merged with weights scaled so each source carries its share. A publisher
greenlet coalesces changes into a snapshot file at most every PUBLISH_INTERVAL; a write
that fails (EMFILE, ENOSPC, EPERM) is logged, counted
(``meshd_snapshot_publish_failures_total``) and retried with jittered backoff.

Fail static: a watch that fails keeps the endpoints it last had and is restarted with
jittered backoff; the last good endpoints are persisted under ``state_dir`` and seed a
restarted meshd (marked stale) until their source answers again.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event

from meshd import rowkeys
from meshd.config import DEFAULT_SERVICE, Config, SourceShare
from meshd.control import state
from meshd.control.counters import COUNTERS
from meshd.control.fleet import FleetRunner
from meshd.control.health import TICK, EndpointRows, HealthKeeper
from meshd.control.rows import RowTable
from meshd.discovery.api import Endpoint, NoSuchService, Update, apply
from meshd.discovery.registry import PluginInfo
from meshd.discovery.registry import load as load_plugin
from meshd.errors import ConfigError, MeshdError
from meshd.fleet.wire import Policy as FleetPolicy
from meshd.identity import spiffe
from meshd.private_files import write_atomic
from meshd.ratelog import Throttle
from meshd.shm import F_REQUESTS, Region
from meshd.snapshot import Snapshot

log = logging.getLogger("meshd.control")

PUBLISH_INTERVAL = 0.02
PUBLISH_RETRY_MIN, PUBLISH_RETRY_MAX = 0.1, 5.0   # a failed publish: jittered backoff
FIRST_SYNC_WAIT = 10.0
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0
EXPIRY_CHECK_INTERVAL = 5.0   # at most; a short discovery_negative_ttl checks more often
# Keys of the rate-limited lines (never a service name: clients choose those).
LOG_STARTED = "discovery: on-demand watches started"
LOG_STOPPED = "discovery: on-demand watches stopped"
LOG_REFUSED = "discovery: watches refused"
LOG_OVER = "discovery: watches over max_watches"


@dataclass
class SourceState:
    endpoints: tuple[Endpoint, ...] = ()
    exists: bool | None = None        # None: not heard from yet
    synced: bool = False              # answered at least once since this process started
    stale: bool = False               # endpoints come from the persisted state
    error: str | None = None
    errors_total: int = 0
    last_sync: float = 0.0            # unix time of the last update


@dataclass
class ServiceWatch:
    name: str
    shares: tuple[SourceShare, ...]
    on_demand: bool
    sources: dict[str, SourceState] = field(default_factory=dict)
    greenlets: list[gevent.Greenlet] = field(default_factory=list)
    last_requests: int = -1
    idle_since: float = 0.0
    started: float = 0.0              # monotonic; the negative cache counts from here

    @property
    def synced(self) -> bool:
        """Every source answered, or left endpoints persisted by an earlier run."""
        return all(s.synced or s.stale for s in self.sources.values())

    @property
    def settled(self) -> bool:
        """Every source answered or failed: the first snapshot need not wait longer."""
        return all(s.synced or s.stale or s.error is not None for s in self.sources.values())

    @property
    def exists(self) -> bool | None:
        known = [s.exists for s in self.sources.values() if s.exists is not None]
        return any(known) if known else None

    def merged(self) -> tuple[Endpoint, ...]:
        """Endpoints of every source, source after source (in the order of ``shares``)."""
        return tuple(e for s in self.sources.values() for e in s.endpoints)

    def splits(self) -> list[tuple[int, int, int]]:
        """With several sources: (share, start, end) of each source's run in ``merged``;
        workers first draw a source by share, then balance within it. Sources without
        endpoints are left out, so the others take their traffic."""
        if len(self.shares) <= 1:
            return []
        out, start = [], 0
        for share in self.shares:
            n = len(self.sources[share.source].endpoints)
            if n:
                out.append((share.share, start, start + n))
            start += n
        return out if len(out) > 1 else []


class DiscoveryRunner:
    def __init__(self, cfg: Config, region: Region, generation: int, path: str,
                 previous: Snapshot | None) -> None:
        self.cfg = cfg
        self.region = region
        self.generation = generation
        self.path = path
        self.rows = RowTable(region, previous.rows if previous else None)
        self.endpoint_rows = EndpointRows(region, previous.endpoint_rows if previous else None)
        self.health = HealthKeeper(region, self.endpoint_rows)
        self.backends: dict[str, Any] = {}
        self.plugin_info: dict[str, PluginInfo] = {}
        self.source_errors: dict[str, str] = {}
        self.watches: dict[str, ServiceWatch] = {}
        # On-demand watches, least recently used first (asked for, or requests seen).
        self.recent: OrderedDict[str, None] = OrderedDict()
        self.per_source: Counter[str] = Counter()     # watches using each source now
        self.evicted: Counter[str] = Counter()        # per source, since start
        self.refused: Counter[str] = Counter()
        self.max_watches = {src.name: src.max_watches for src in cfg.discovery}
        self.throttle = Throttle(log)
        self._last_idle_scan = 0.0
        self.state_path = state.state_path(cfg.state_dir, cfg.instance)
        self.saved, self.saved_at = state.load(self.state_path)
        self.seq = 0
        self.dirty = gevent.event.Event()
        self.first_published = gevent.event.Event()
        # The seq of the first snapshot published while no watch owed its first answer
        # (None: not yet): /ready waits until every serving worker has loaded it or a later one.
        self.ready_seq: int | None = None
        self._last_save = 0.0
        self.publish_failures = 0              # since this control process started
        self.publish_error: str | None = None  # the last attempt's, while it keeps failing
        self._publish_log = Throttle(log, burst=3, interval=60.0)
        # Fleet policies (``meshd.control.fleet``): watched with each service, published
        # in the snapshot; the services they name are pinned (watched, never expired).
        self.fleet = FleetRunner(cfg)
        self.fleet.on_refs = self.pin
        self.fleet.on_change = self.dirty.set
        self.fleet.on_policy = self._fleet_route_rows
        self.configured: set[str] = set()
        self.pinned: set[str] = set()

    # -- start --------------------------------------------------------------------------

    def start(self) -> None:
        self._load_backends()
        self.fleet.start()
        for lst in self.cfg.listeners:
            self.rows.ensure(lst.name, "")
            if lst.direction == "inbound":
                assert lst.forward is not None
                self.rows.ensure(lst.name, str(lst.forward))
                if lst.mtls != "off":  # TLS peers without a certificate, or without a row
                    for peer in ("", rowkeys.OTHER):
                        self.rows.ensure(lst.name, rowkeys.key(str(lst.forward), True, peer))
            elif lst.protocol == "tcp" and lst.service:
                self.rows.ensure(lst.name, lst.service)
        self.rows.routes(self.cfg)
        self.configured = set(self._configured_services())
        for service in self._configured_services():
            self.watch(service, on_demand=False)
        gevent.spawn(self._publisher)
        gevent.spawn(self._expiry_loop)
        gevent.spawn(self._health_loop)

    def _load_backends(self) -> None:
        for src in self.cfg.discovery:
            try:
                cls, info = load_plugin(src.plugin)
                self.plugin_info[src.name] = info
                self.backends[src.name] = cls(src.name, src.options)
            except ConfigError as e:
                msg = "; ".join(f"{k}: {m}" for k, m in e.problems)
                self.source_errors[src.name] = msg
                log.error("discovery source %s: %s", src.name, msg)
            except MeshdError as e:
                self.source_errors[src.name] = str(e)
                log.error("discovery source %s: %s", src.name, e)

    def _configured_services(self) -> list[str]:
        names: dict[str, None] = {}
        for name, backend in self.backends.items():
            try:
                names.update(dict.fromkeys(backend.services()))
            except Exception as e:
                log.error("discovery source %s (%s): services() failed: %s", name,
                          self._describe(name), e)
        names.update(dict.fromkeys(self.cfg.services))
        names.update(dict.fromkeys(self.cfg.route_services()))
        for lst in self.cfg.listeners:
            if lst.protocol == "tcp" and lst.service and lst.direction == "outbound":
                names[lst.service] = None
        return list(names)

    def _shares_for(self, service: str) -> tuple[SourceShare, ...]:
        svc = self.cfg.services.get(service)
        if svc is not None and svc.sources:
            return svc.sources
        maybe = None   # the first source that does not say it lacks the service
        for name, backend in self.backends.items():
            if hasattr(backend, "knows"):
                found = self.knows(name, service)   # from memory: no I/O per made-up name
            else:
                try:  # a plugin without knows(): its list (API version 1)
                    found = service in backend.services() or None
                except Exception:
                    continue
            if found:
                return (SourceShare(name, 100),)
            if found is None and maybe is None:
                maybe = name
        if maybe is not None:
            return (SourceShare(maybe, 100),)
        if self.cfg.discovery:
            return (SourceShare(self.cfg.discovery[0].name, 100),)
        return ()

    def _describe(self, source: str) -> str:
        info = self.plugin_info.get(source)
        return f"plugin {info.describe()}" if info else "plugin not loaded"

    def knows(self, source: str, service: str) -> bool | None:
        """The source's ``knows(service)``; None when it cannot tell (or has no such method)."""
        fn = getattr(self.backends.get(source), "knows", None)
        if fn is None:
            return None
        try:
            known = fn(service)
        except Exception as e:
            self.throttle.warning(f"discovery source {source}: knows() failed",
                                  "discovery source %s (%s): knows(%r) failed: %s", source,
                                  self._describe(source), service, e)
            return None
        return None if known is None else bool(known)

    def _protected(self, w: ServiceWatch) -> bool:
        """Never evicted: configured, found to exist, or known to one of its sources."""
        return (not w.on_demand or w.exists is True
                or any(self.knows(s.source, w.name) for s in w.shares))

    # -- watching -----------------------------------------------------------------------

    def watch(self, service: str, on_demand: bool) -> None:
        if not service:
            return
        if service in self.watches:
            if service in self.recent:
                self.recent.move_to_end(service)   # asked for again: recently used
            return
        shares = self._shares_for(service)
        if not self._make_room(service, shares, on_demand):
            return
        now = time.monotonic()
        w = ServiceWatch(service, shares, on_demand, idle_since=now, started=now)
        self.watches[service] = w
        self.per_source.update(s.source for s in shares)
        if on_demand:
            self.recent[service] = None
        if not on_demand:
            self._ensure_rows(service)
        saved = self.saved.get(service, {})
        for share in shares:
            st = SourceState()
            if share.source in saved:
                st.endpoints, st.exists, st.stale = saved[share.source], True, True
            w.sources[share.source] = st
            backend = self.backends.get(share.source)
            if backend is None:
                st.error = self.source_errors.get(share.source, f"no source {share.source}")
                st.synced = True
                continue
            w.greenlets.append(gevent.spawn(self._watch_loop, w, share.source, backend))
        self.fleet.watch(service, on_demand)
        if on_demand:
            self.throttle.info(LOG_STARTED, "watching %s on demand (sources: %s)", service,
                               ", ".join(s.source for s in shares) or "none")
        self.dirty.set()

    def _make_room(self, service: str, shares: tuple[SourceShare, ...], on_demand: bool) -> bool:
        """Below each source's ``max_watches`` for one more watch: stop the least recently
        used unprotected watch of a full source. False: refuse ``service``, which is
        unknown and finds only known or found services holding the cap. A configured or
        known service is never refused (it may go past the cap: a warning says so)."""
        known = not on_demand or any(self.knows(s.source, service) for s in shares)
        for share in shares:
            source = share.source
            cap = self.max_watches.get(source, 0)
            if not cap or self.per_source[source] < cap:
                continue
            victim = next((name for name in self.recent
                           if any(s.source == source for s in self.watches[name].shares)
                           and not self._protected(self.watches[name])), None)
            if victim is not None:
                self.evicted[source] += 1
                COUNTERS.add(_per_source("meshd_discovery_watches_evicted_total", source))
                self.unwatch(victim, f"the least recently used of {cap} watches (max_watches) "
                                     f"of source {source}")
            elif not known:
                self.refused[source] += 1
                COUNTERS.add(_per_source("meshd_discovery_watches_refused_total", source))
                self.throttle.warning(LOG_REFUSED, "not watching %s: source %s has %d watches "
                                      "(max_watches) of services it knows or found", service,
                                      source, cap)
                return False
            else:
                self.throttle.warning(LOG_OVER, "watching %s past max_watches = %d of source "
                                      "%s: every watch is of a service it knows", service,
                                      cap, source)
        return True

    def _ensure_rows(self, service: str) -> None:
        """Rows for a service: at once for configured ones, and for one watched on demand
        only once it exists (made-up Host headers must not use up shared memory)."""
        for lst in self.cfg.listeners:
            if lst.direction == "outbound" and lst.protocol != "tcp":
                self.rows.ensure(lst.name, service)

    def _ensure_tls_rows(self, service: str, endpoints: tuple[Endpoint, ...]) -> None:
        """With [identity]: the rows of a service's mTLS traffic (``meshd.rowkeys``) on the
        listeners that count it, up front: the endpoints say which identity it goes to."""
        row_key = rowkeys.outbound_key(True, service, endpoints)
        if row_key == service:
            return
        for listener, by_key in self.rows.rows.items():
            if service in by_key and row_key not in by_key:
                self.rows.ensure(listener, row_key)

    def _fleet_route_rows(self, service: str, policy: FleetPolicy) -> None:
        """A fleet policy's routes get their metric rows (``RowTable.fleet_routes``) as
        it takes effect, in the snapshot that publishes it: no request of a route counts
        under route="_overflow" for want of a reload."""
        if policy.routes is not None:
            self.rows.fleet_routes(self.cfg, service, [r.name for r in policy.routes.routes])

    def authority_row(self, listener: str, base_key: str, authority: str) -> None:
        """A worker saw requests counted on ``base_key``'s row of ``listener`` name
        ``authority``: a row of their own (``RowTable.authority``), published."""
        if self.rows.authority(listener, base_key, authority, self.throttle):
            self.dirty.set()

    def client_row(self, listener: str, client_id: str) -> None:
        """A worker saw ``client_id`` (a verified peer identity) on ``listener``: give it
        its own rows, up to ``rowkeys.MAX_CLIENT_IDS`` identities per listener (the rest
        stay under client_id="other")."""
        lst = next((x for x in self.cfg.listeners if x.name == listener), None)
        if (lst is None or lst.direction != "inbound" or lst.mtls == "off"
                or spiffe.problem(client_id) is not None):
            return
        by_key = self.rows.rows.get(listener, {})
        row_key = rowkeys.key(str(lst.forward), True, client_id)
        if row_key in by_key:
            return
        ids = sum(1 for k in by_key if (p := rowkeys.parts(k)).peer_id not in ("", rowkeys.OTHER)
                  and not p.authority)
        if ids >= rowkeys.MAX_CLIENT_IDS:
            self.throttle.info(f"{listener}: client rows", "listener %s: %d client identities "
                               "have their own metric rows; more count under "
                               'client_id="other"', listener, ids)
            return
        self.rows.ensure(listener, row_key)
        self.dirty.set()

    def _watch_loop(self, w: ServiceWatch, source: str, backend: Any) -> None:
        st = w.sources[source]
        failures = 0
        while True:
            try:
                for update in backend.watch(w.name):
                    self._apply(w, st, update)
                    failures = 0
                log.warning("discovery %s: the watch of %s ended; restarting", source, w.name)
            except Exception as e:
                failures += 1
                st.errors_total += 1
                COUNTERS.add(_errors_name(w.name, source))
                st.error = f"{type(e).__name__}: {e}"
                args = ("discovery source %s (%s): watch of %s failed: %s; keeping its last "
                        "%d endpoints", source, self._describe(source), w.name, st.error,
                        len(st.endpoints))
                if w.on_demand and w.exists is not True:  # a name a client made up, maybe
                    self.throttle.log(logging.ERROR, f"discovery source {source}: on-demand "
                                      "watches failed", *args)
                else:
                    log.error(*args)
                self.dirty.set()
            delay = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(failures, 10))
            gevent.sleep(delay * random.uniform(0.5, 1.0))

    def _apply(self, w: ServiceWatch, st: SourceState, update: Update) -> None:
        if isinstance(update, NoSuchService):
            st.exists, st.endpoints = False, ()
        else:
            if w.on_demand and not st.exists:
                self._ensure_rows(w.name)
            st.exists = True
            st.endpoints = apply(() if st.stale else st.endpoints, update)
        st.stale = False
        st.synced = True
        st.error = None
        st.last_sync = time.time()
        self.dirty.set()

    def unwatch(self, service: str, why: str) -> None:
        w = self.watches.pop(service, None)
        if w is not None:
            gevent.killall(w.greenlets, block=False)
            self.fleet.unwatch(service)
            self.recent.pop(service, None)
            self.per_source.subtract(s.source for s in w.shares)
            if w.on_demand:
                self.throttle.info(LOG_STOPPED, "stopped watching %s (%s)", service, why)
            else:
                log.info("stopped watching %s (%s)", service, why)
            self.dirty.set()

    def pin(self, names: set[str]) -> None:
        """The services fleet policies name now: watched like configured ones (from the
        moment a policy names them, and never expired while it does)."""
        for name in sorted(names - self.pinned):
            w = self.watches.get(name)
            if w is None:
                self.watch(name, on_demand=False)
            elif w.on_demand:
                w.on_demand = False
                self.recent.pop(name, None)
                self._ensure_rows(name)
        for name in self.pinned - names:
            w = self.watches.get(name)
            if w is not None and not w.on_demand and name not in self.configured:
                # On demand again: expired after service_idle_expiry without requests.
                w.on_demand, w.idle_since, w.last_requests = True, time.monotonic(), -1
                self.recent[name] = None
        self.pinned = set(names)

    def _health_loop(self) -> None:
        while True:
            gevent.sleep(TICK)
            services = {}
            for name, w in self.watches.items():
                svc = self.cfg.services.get(name)
                services[name] = (w.merged(), (svc or DEFAULT_SERVICE).failure_accrual)
            try:
                self.health.tick(services, time.monotonic())
            except Exception:
                log.exception("failure accrual tick failed")

    def _expiry_loop(self) -> None:
        interval = min(EXPIRY_CHECK_INTERVAL, max(0.05, self.cfg.discovery_negative_ttl / 4))
        while True:
            gevent.sleep(interval)
            self.expire_idle(time.monotonic())

    def expire_idle(self, now: float) -> None:
        ttl = self.cfg.discovery_negative_ttl
        # Requests are summed from shared memory: at most every EXPIRY_CHECK_INTERVAL,
        # however often the negative cache is looked at.
        scan = now - self._last_idle_scan >= EXPIRY_CHECK_INTERVAL
        if scan:
            self._last_idle_scan = now
        for w in list(self.watches.values()):
            if not w.on_demand:
                continue
            if w.exists is not True and w.settled and now - w.started >= ttl:
                # The negative cache: absent or failing alike (fail static is for
                # endpoints once found, and this watch never found any).
                self.unwatch(w.name, "no source has it" if w.exists is False else
                             "its watch fails and found nothing")
                continue
            if not scan:
                continue
            requests = sum(self.region.row_totals(r)[F_REQUESTS] for r in self.rows.service_rows(w.name))
            if requests != w.last_requests:
                if w.last_requests >= 0:
                    self.recent.move_to_end(w.name)   # traffic: recently used
                w.last_requests, w.idle_since = requests, now
            elif now - w.idle_since >= self.cfg.service_idle_expiry:
                self.unwatch(w.name, f"no requests for {self.cfg.service_idle_expiry:.0f}s")

    # -- publishing ---------------------------------------------------------------------

    def pending(self) -> list[tuple[str, list[str]]]:
        """Each watch still owed its first answer, with the sources that owe it (a
        failing source that is stale owes nothing)."""
        return [(w.name, [src for src, st in w.sources.items() if not (st.synced or st.stale)])
                for w in self.watches.values() if not w.synced]

    @property
    def all_synced(self) -> bool:
        return all(w.synced for w in self.watches.values())

    def _publisher(self) -> None:
        started = time.monotonic()
        while ((not all(w.settled and self.fleet.settled(w.name) for w in self.watches.values())
                or not all(self.fleet.settled(s) for s in self.fleet.inbound))  # authorization
               and time.monotonic() - started < FIRST_SYNC_WAIT):
            self.dirty.wait(0.05)
            self.dirty.clear()
        if not self.all_synced:
            pending = [w.name for w in self.watches.values() if not w.synced]
            log.warning("publishing endpoints before every source answered: %s", ", ".join(pending))
        failures = 0   # in a row
        while True:
            if self._try_publish():
                failures = 0
                self.first_published.set()
                self.dirty.wait()
                self.dirty.clear()
                gevent.sleep(PUBLISH_INTERVAL)
                continue
            # Workers keep the snapshot they have (fail static); the retry writes the newest
            # state, so changes meanwhile need no wake-up of their own.
            failures += 1
            delay = min(PUBLISH_RETRY_MAX, PUBLISH_RETRY_MIN * 2 ** min(failures, 16))
            self.dirty.clear()
            gevent.sleep(delay * random.uniform(0.5, 1.0))

    def _try_publish(self) -> bool:
        """One attempt; a failure (EMFILE, ENOSPC, EPERM...) is logged, counted and shown
        in /metrics and /endpoints, and the publisher retries."""
        try:
            self._publish()
        except Exception as e:   # the publisher must outlive any one failed write
            self.publish_failures += 1
            COUNTERS.add(PUBLISH_FAILURES)
            self.publish_error = (f"{e.strerror}" if isinstance(e, OSError) and e.strerror
                                  else f"{type(e).__name__}: {e}")
            self._publish_log.log(logging.ERROR, "publish", "cannot publish the endpoint "
                                  "snapshot %s: %s; workers keep the one they have, retrying",
                                  self.path, self.publish_error)
            return False
        if self.publish_error is not None:
            log.info("endpoint snapshot %s published again (%d failed attempts since the "
                     "control process started)", self.path, self.publish_failures)
            self.publish_error = None
        return True

    def snapshot(self) -> Snapshot:
        services: dict[str, tuple[Endpoint, ...]] = {}
        splits: dict[str, list[tuple[int, int, int]]] = {}
        absent: list[str] = []
        errors: dict[str, str] = {}
        for name, w in self.watches.items():
            if w.on_demand and not self.fleet.settled(name):
                continue   # a worker waiting for it must get its policy with its endpoints
            exists = w.exists
            if exists:
                services[name] = w.merged()
                self.endpoint_rows.ensure(services[name])
                if self.cfg.identity is not None:
                    self._ensure_tls_rows(name, services[name])
                if w.splits():
                    splits[name] = w.splits()
            elif exists is False or (w.synced and not w.sources):
                absent.append(name)
            errs = [f"{src}: {st.error}" for src, st in w.sources.items() if st.error]
            if errs:
                errors[name] = "; ".join(errs)
        return Snapshot(generation=self.generation, seq=self.seq, services=services,
                        rows=self.rows.rows, synced=self.all_synced, errors=errors,
                        absent=frozenset(absent), endpoint_rows=dict(self.endpoint_rows.rows),
                        splits=splits, fleet=self.fleet.blobs, fleet_version=self.fleet.version)

    def _publish(self) -> None:
        self.seq += 1
        # before the write: what this snapshot holds
        complete = not self.pending() and not self.fleet.pending()
        snap = self.snapshot()
        write_atomic(self.path, snap.encode())
        self.fleet.published_version = snap.fleet_version
        if complete and self.ready_seq is None:
            self.ready_seq = self.seq
        now = time.monotonic()
        if now - self._last_save >= state.SAVE_INTERVAL:
            self._save()
        else:
            gevent.spawn_later(state.SAVE_INTERVAL, self._save)

    def _save(self) -> None:
        self._last_save = time.monotonic()
        good = {name: {src: st.endpoints for src, st in w.sources.items() if st.exists}
                for name, w in self.watches.items()}
        merged = dict(self.saved)
        merged.update({k: v for k, v in good.items() if v})
        try:
            state.save(self.state_path, merged)
            self.saved = merged
        except OSError as e:
            log.warning("cannot persist endpoints to %s: %s", self.state_path, e)

    def close(self) -> None:
        self.fleet.close()
        for backend in self.backends.values():
            try:
                backend.close()
            except Exception as e:
                log.warning("closing discovery backend: %s", e)

    # -- reporting ----------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What /endpoints shows."""
        now = time.time()
        now_m = time.monotonic()
        services = {}
        for name, w in sorted(self.watches.items()):
            services[name] = {
                "exists": w.exists,
                "on_demand": w.on_demand,
                "endpoints": [_endpoint_json(e) | self.health.describe(e, now_m, now)
                              for e in w.merged()],
                "sources": {
                    src: {
                        "synced": st.synced,
                        "stale": st.stale,
                        "error": st.error,
                        "errors_total": st.errors_total,
                        "last_sync_age_s": round(now - st.last_sync, 3) if st.last_sync else None,
                        "endpoints": len(st.endpoints),
                    }
                    for src, st in w.sources.items()
                },
            }
        return {
            "services": services,
            "sources": {src.name: {"plugin": src.plugin, "distribution": self._describe(src.name),
                                   "error": self.source_errors.get(src.name),
                                   "watches": self.per_source[src.name],
                                   "max_watches": src.max_watches,
                                   "evicted_total": self.evicted[src.name],
                                   "refused_total": self.refused[src.name]}
                        for src in self.cfg.discovery},
            "persisted": {"path": self.state_path, "saved_at": self.saved_at or None},
            "published": {"path": self.path, "seq": self.seq, "error": self.publish_error,
                          "failures_total": self.publish_failures},
        }

    def prometheus(self) -> Iterable[str]:
        """Discovery health, appended to /metrics."""
        yield "# HELP meshd_snapshot_publish_failures_total Failed writes of the endpoint snapshot."
        yield "# TYPE meshd_snapshot_publish_failures_total counter"
        yield f"{PUBLISH_FAILURES} {COUNTERS.value(PUBLISH_FAILURES)}"
        yield "# HELP meshd_snapshot_publish_failing 1 while workers may miss discovery changes."
        yield "# TYPE meshd_snapshot_publish_failing gauge"
        yield f"meshd_snapshot_publish_failing {int(self.publish_error is not None)}"
        yield "# HELP meshd_discovery_endpoints Endpoints of a service now."
        yield "# TYPE meshd_discovery_endpoints gauge"
        for name, w in sorted(self.watches.items()):
            yield f'meshd_discovery_endpoints{{service="{_esc(name)}"}} {len(w.merged())}'
        rows: list[tuple[str, str, SourceState]] = [
            (name, src, st) for name, w in sorted(self.watches.items()) for src, st in w.sources.items()]
        yield "# HELP meshd_discovery_last_sync_timestamp_seconds When a source last updated a service."
        yield "# TYPE meshd_discovery_last_sync_timestamp_seconds gauge"
        for name, src, st in rows:
            yield (f'meshd_discovery_last_sync_timestamp_seconds{{service="{_esc(name)}",'
                   f'source="{_esc(src)}"}} {st.last_sync:.3f}')
        yield "# HELP meshd_discovery_stale Endpoints served from the persisted state or a failing watch."
        yield "# TYPE meshd_discovery_stale gauge"
        for name, src, st in rows:
            stale = int(st.stale or st.error is not None)
            yield f'meshd_discovery_stale{{service="{_esc(name)}",source="{_esc(src)}"}} {stale}'
        yield "# HELP meshd_discovery_watches Watches of a source now (max_watches bounds those of unknown names)."
        yield "# TYPE meshd_discovery_watches gauge"
        sources = [d.name for d in self.cfg.discovery]
        for source in sources:
            yield f'meshd_discovery_watches{{source="{_esc(source)}"}} {self.per_source[source]}'
        yield ("# HELP meshd_discovery_watches_evicted_total Watches of unknown names stopped to "
               "stay within max_watches.")
        yield "# TYPE meshd_discovery_watches_evicted_total counter"
        for source in sources:
            counter = _per_source("meshd_discovery_watches_evicted_total", source)
            yield f"{counter} {COUNTERS.value(counter)}"
        yield ("# HELP meshd_discovery_watches_refused_total Names not watched: max_watches was "
               "held by services the source knows or found.")
        yield "# TYPE meshd_discovery_watches_refused_total counter"
        for source in sources:
            counter = _per_source("meshd_discovery_watches_refused_total", source)
            yield f"{counter} {COUNTERS.value(counter)}"
        yield "# HELP meshd_discovery_errors_total Failed watches."
        yield "# TYPE meshd_discovery_errors_total counter"
        for name, src, _st in rows:
            counter = _errors_name(name, src)
            yield f"{counter} {COUNTERS.value(counter)}"


def _endpoint_json(e: Endpoint) -> dict[str, Any]:
    out: dict[str, Any] = {"address": str(e), "weight": e.weight}
    if e.zone:
        out["zone"] = e.zone
    if e.meshed:
        out.update(meshed=True, inbound_port=e.inbound_port, identity=e.identity)
    if e.labels:
        out["labels"] = dict(e.labels)
    return out


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# Counters kept in the region's control tables (meshd.control.counters), by their name.
PUBLISH_FAILURES = "meshd_snapshot_publish_failures_total"


def _per_source(family: str, source: str) -> str:
    return f'{family}{{source="{_esc(source)}"}}'


def _errors_name(service: str, source: str) -> str:
    return f'meshd_discovery_errors_total{{service="{_esc(service)}",source="{_esc(source)}"}}'

