"""Running config sources in the control process: the fleet policy of every service.

A service's policy is watched exactly while its endpoints are (``DiscoveryRunner`` calls
``watch`` / ``unwatch``): configured services, services a discovery source lists, names
workers asked for (bounded by discovery's ``max_watches``), and the services a policy in
effect names (its destinations, split targets, failover targets: ``pin``ned in
discovery, so they are watched from the moment a policy names them, not on a first
request). One greenlet per (service, source) iterates the plugin's ``watch``.

Each source's parts of a service are kept apart (``PartState``). The effective policy of
a service takes each kind of part (routes, split, resolver) from the first source, in
file order, that has one, unless the file names the service (``docs/config-sources.md``,
"Precedence"): a local ``[[route]]`` host keeps its file routes (fleet routes and split
not applied), a ``[service.NAME]`` table keeps its failover and timeouts (fleet resolver
not applied). The effective policies go to workers in the snapshot, with a version that
changes with them, and ``/config`` shows them with where each part came from.

Authorization (the ``authz`` part): the services inbound listeners serve (``[[listener]]
service``) are watched from the start and for as long as meshd runs, with a second
stream per source that has ``watch_authorization``; until that stream answered (or the
state file had a part), the service's effective ``authz`` part denies everything (fail
closed). The file's ``[[authorization]]`` tables win per listener, in the worker.

Refusals: a part the plugin refuses, or that breaks meshd's bounds (``wire.problem``),
leaves the last good part of its kind in use; it is logged (once per change), counted
(``meshd_fleet_refused_entries``) and named in ``/ready``'s detail (meshd stays ready).
A watch that raises keeps its parts (fail static) and is restarted with jittered backoff.

Persistence: the parts of every source are saved under ``state_dir`` (``{instance}.fleet``,
at most every SAVE_INTERVAL) and seed a restarted meshd, marked stale, until the source
answers again: a restart while Consul is down routes with the last good policies.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import gevent
import msgpack

from meshd.config import Config
from meshd.control.counters import COUNTERS
from meshd.control.state import SAVE_INTERVAL
from meshd.errors import ConfigError, MeshdError
from meshd.fleet import wire
from meshd.fleet.api import (
    PART_KINDS,
    Authorization,
    Clear,
    Part,
    PartKind,
    Refused,
    Set,
    Update,
    kind_of,
)
from meshd.fleet.registry import PluginInfo
from meshd.fleet.registry import load as load_plugin
from meshd.private_files import read_trusted, write_atomic
from meshd.ratelog import Throttle

log = logging.getLogger("meshd.control")

BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0
# A service watched on demand is published once its policy answered, or this long after
# its watch started (a source that is slow to answer must not hold its traffic back).
FIRST_ANSWER_WAIT = 1.0
STATE_FORMAT = 1
READY_NAMES = 10


@dataclass
class PartState:
    """What one source gave for one service."""
    parts: dict[str, Part] = field(default_factory=dict)                 # kind -> part
    encoded: dict[str, Any] = field(default_factory=dict)                # kind -> wire.encode(part)
    refused: dict[str, tuple[str, str]] = field(default_factory=dict)    # kind -> (entry, why)
    synced: bool = False        # answered at least once since this process started
    stale: bool = False         # parts come from the persisted state
    error: str | None = None
    errors_total: int = 0
    last_update: float = 0.0    # unix time
    # Authorization (``watch_authorization``, for the services of inbound listeners):
    # expected of this source, and whether each of its streams answered yet.
    authz_expected: bool = False
    answered_parts: bool = False
    answered_authz: bool = False

    @property
    def answered(self) -> bool:
        """Every stream this source runs for the service answered once."""
        return self.answered_parts and (self.answered_authz or not self.authz_expected)


@dataclass
class FleetWatch:
    name: str
    sources: dict[str, PartState] = field(default_factory=dict)
    greenlets: list[gevent.Greenlet] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @property
    def settled(self) -> bool:
        """Every source answered, failed, or left parts persisted by an earlier run (or
        FIRST_ANSWER_WAIT passed)."""
        return (all(s.answered or s.stale or s.error is not None for s in self.sources.values())
                or time.monotonic() - self.started >= FIRST_ANSWER_WAIT)


class FleetRunner:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.sources: dict[str, Any] = {}
        self.plugin_info: dict[str, PluginInfo] = {}
        self.source_errors: dict[str, str] = {}
        self.watches: dict[str, FleetWatch] = {}
        self.policies: dict[str, wire.Policy] = {}
        self.origins: dict[str, dict[str, str]] = {}       # service -> kind -> origin
        self.overridden: dict[str, dict[str, str]] = {}    # service -> kind -> fleet origin
        self.refs: dict[str, set[str]] = {}                # service -> services its policy names
        self.blobs: dict[str, bytes] = {}                  # service -> its policy, packed once
        self.version = f"{os.getpid()}.{time.monotonic_ns()}.0"
        self.published_version = ""   # that of the snapshot published last
        self._changes = 0
        self.refusals_total = 0
        self.throttle = Throttle(log)
        self.local_routes = {r.host for r in cfg.routes}
        self.local_services = set(cfg.services)
        # Services inbound listeners serve: their authorization is watched for as long
        # as meshd runs (not only while discovery watches them), and the file's
        # [[authorization]] listeners, which keep their own policies.
        self.inbound = {lst.service for lst in cfg.listeners
                        if lst.direction == "inbound" and lst.service}
        self.local_authz = {a.listener for a in cfg.authorization}
        self.state_path = os.path.join(cfg.state_dir, f"{cfg.instance}.fleet")
        self.saved, self.saved_at = self._load()
        self._save_pending = False
        self._last_save = 0.0
        # Set by the control process: called with the new policies' referenced services
        # (discovery pins them) and after every change (discovery publishes).
        self.on_refs: Callable[[set[str]], None] = lambda names: None
        self.on_change: Callable[[], None] = lambda: None
        # Set by the control process: called with a service and its new effective policy
        # before it is published (discovery gives its routes metric rows).
        self.on_policy: Callable[[str, wire.Policy], None] = lambda service, policy: None

    # -- start --------------------------------------------------------------------------

    def start(self) -> None:
        for src in self.cfg.config_sources:
            try:
                cls, info = load_plugin(src.plugin)
                self.plugin_info[src.name] = info
                self.sources[src.name] = cls(src.name, src.options)
            except ConfigError as e:
                msg = "; ".join(f"{k}: {m}" for k, m in e.problems)
                self.source_errors[src.name] = msg
                log.error("config source %s: %s", src.name, msg)
            except MeshdError as e:
                self.source_errors[src.name] = str(e)
                log.error("config source %s: %s", src.name, e)
        for service in sorted(self.inbound):
            self.watch(service)

    def describe_source(self, source: str) -> str:
        info = self.plugin_info.get(source)
        return f"plugin {info.describe()}" if info else "plugin not loaded"

    # -- watching -----------------------------------------------------------------------

    def watch(self, service: str, on_demand: bool = False) -> None:
        if not self.cfg.config_sources or service in self.watches:
            return
        w = FleetWatch(service)
        self.watches[service] = w
        saved = self.saved.get(service, {})
        for src in self.cfg.config_sources:
            st = PartState()
            if src.name in saved:
                try:
                    st.parts = {k: wire.decode(raw) for k, raw in saved[src.name].items()}
                    st.encoded, st.stale = dict(saved[src.name]), True
                except ValueError as e:
                    log.warning("ignoring the persisted fleet policy of %s from %s: %s",
                                service, src.name, e)
                    st.parts = {}
            w.sources[src.name] = st
            plugin = self.sources.get(src.name)
            if plugin is None:
                st.error = self.source_errors.get(src.name, "not loaded")
                continue
            w.greenlets.append(gevent.spawn(self._watch_loop, w, src.name, plugin, on_demand))
            if service in self.inbound and hasattr(plugin, "watch_authorization"):
                st.authz_expected = True
                w.greenlets.append(gevent.spawn(self._watch_loop, w, src.name, plugin,
                                                on_demand, "watch_authorization"))
        if saved or service in self.inbound:   # (inbound: denied until the sources answer)
            self._changed(service)
        gevent.spawn_later(FIRST_ANSWER_WAIT, self.on_change)   # see FIRST_ANSWER_WAIT

    def unwatch(self, service: str) -> None:
        if service in self.inbound:
            return   # watched for its inbound listeners' authorization, whatever discovery does
        w = self.watches.pop(service, None)
        if w is not None:
            gevent.killall(w.greenlets, block=False)
            self._changed(service)

    def _watch_loop(self, w: FleetWatch, source: str, plugin: Any, on_demand: bool,
                    stream: str = "watch") -> None:
        st = w.sources[source]
        failures = 0
        while True:
            try:
                for update in getattr(plugin, stream)(w.name):
                    if stream == "watch":
                        st.answered_parts = True
                    else:
                        st.answered_authz = True
                    self._apply(w, source, st, update)
                    failures = 0
                log.warning("config source %s: the watch of %s ended; restarting", source, w.name)
            except Exception as e:
                failures += 1
                st.errors_total += 1
                COUNTERS.add(_errors_name(w.name, source))
                st.error = f"{type(e).__name__}: {e}"
                args = ("config source %s (%s): watch of %s failed: %s; keeping its last "
                        "good parts (%s)", source, self.describe_source(source), w.name,
                        st.error, ", ".join(sorted(st.parts)) or "none")
                if on_demand and not st.parts:   # a name a client made up, maybe
                    self.throttle.log(logging.ERROR, f"config source {source}: on-demand "
                                      "watches failed", *args)
                else:
                    log.error(*args)
                self.on_change()
            delay = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(failures, 10))
            gevent.sleep(delay * random.uniform(0.5, 1.0))

    def _apply(self, w: FleetWatch, source: str, st: PartState, update: Update) -> None:
        if isinstance(update, Set):
            kind = kind_of(update.part)
            why = wire.problem(update.part)
            if why is not None:
                self._refuse(w, source, st, kind, update.part.entry, why)
            else:
                st.parts[kind] = update.part
                st.encoded[kind] = wire.encode(update.part)
                if st.refused.pop(kind, None) is not None:
                    log.info("config source %s: %s for %s accepted again", source,
                             update.part.entry, w.name)
        elif isinstance(update, Clear):
            st.parts.pop(update.kind, None)
            st.encoded.pop(update.kind, None)
            st.refused.pop(update.kind, None)
        elif isinstance(update, Refused):
            self._refuse(w, source, st, update.kind, update.entry, update.reason)
        else:
            raise TypeError(f"not a config-source update: {type(update).__name__}")
        st.synced, st.stale, st.error = True, False, None
        st.last_update = time.time()
        self._changed(w.name)

    def _refuse(self, w: FleetWatch, source: str, st: PartState, kind: PartKind, entry: str,
                why: str) -> None:
        if st.refused.get(kind) == (entry, why):
            return   # said already (a blocking query returned the same entry)
        st.refused[kind] = (entry, why)
        self.refusals_total += 1
        COUNTERS.add(REFUSED)
        kept = st.parts.get(kind)
        log.error("config source %s (%s): refused %s for service %s: %s; %s", source,
                  self.describe_source(source), entry, w.name, why,
                  f"keeping the last good {kept.entry}" if kept else "nothing of its kind applies")

    # -- the effective policies ---------------------------------------------------------

    def _changed(self, service: str) -> None:
        """``service``'s parts changed (or it is no longer watched): its effective policy
        again, and when that changed, a new version and the services policies name."""
        policy, where, over = self._effective(service)
        self.origins.pop(service, None)
        self.overridden.pop(service, None)
        if where:
            self.origins[service] = where
        if over:
            self.overridden[service] = over
        if policy != self.policies.get(service):
            if policy is None:
                del self.policies[service]
                self.refs.pop(service, None)
                self.blobs.pop(service, None)
            else:
                self.policies[service] = policy
                self.refs[service] = wire.referenced(policy)
                self.blobs[service] = wire.pack(policy)
                self.on_policy(service, policy)
            self._changes += 1
            self.version = f"{self.version.rsplit('.', 1)[0]}.{self._changes}"
            self.on_refs(set().union(*self.refs.values()))
        self.on_change()
        self._schedule_save()

    def _effective(self, name: str) -> tuple[wire.Policy | None, dict[str, str], dict[str, str]]:
        """(policy, where each part came from, what the file overrides) of ``name``."""
        w = self.watches.get(name)
        if w is None:
            return None, {}, {}
        chosen: dict[str, Part] = {}
        where: dict[str, str] = {}
        overridden: dict[str, str] = {}
        for kind in PART_KINDS:
            for src in self.cfg.config_sources:
                st = w.sources.get(src.name)
                part = st.parts.get(kind) if st is not None else None
                if part is None:
                    continue
                origin = f"{src.name}: {part.entry}"
                if self._local(name, kind):
                    overridden[kind] = origin
                else:
                    chosen[kind], where[kind] = part, origin
                break
        if name in self.inbound and "authz" not in chosen:
            waiting = [src for src, st in w.sources.items()
                       if st.authz_expected and not st.answered_authz and not st.stale]
            if waiting:   # fail closed until the policy is known (meshd.fleet.api)
                chosen["authz"] = Authorization(f"(no answer yet from {', '.join(waiting)})")
                where["authz"] = "meshd: every request denied until the sources answer"
        if not chosen:
            return None, where, overridden
        return (wire.Policy(name, chosen.get("routes"), chosen.get("split"),  # type: ignore[arg-type]
                            chosen.get("resolver"), chosen.get("authz")),  # type: ignore[arg-type]
                where, overridden)

    def _local(self, service: str, kind: str) -> bool:
        """The file decides this part of ``service`` (see the module's docstring)."""
        if kind in ("routes", "split"):
            return service in self.local_routes
        if kind == "authz":
            return False   # per listener, in the worker: [[authorization]] names listeners
        return service in self.local_services

    def settled(self, service: str) -> bool:
        w = self.watches.get(service)
        return w is None or w.settled

    def pending(self) -> list[tuple[str, list[str]]]:
        """Each watch still owed its first answer, with the sources that owe it. A
        source whose watch failed owes nothing (as for ``FleetWatch.settled``): a meshd
        restarted while its source is down is ready with what it persisted, not held
        unready for as long as the outage lasts; the failure shows in the metrics."""
        def owes(st: Any) -> bool:
            return not (st.answered or st.stale or st.error is not None)
        return [(w.name, [s for s, st in w.sources.items() if owes(st)])
                for w in self.watches.values()
                if any(owes(st) for st in w.sources.values())]

    def refused(self) -> list[tuple[str, str, str, str, str]]:
        """(service, source, kind, entry, why) of every refused entry now."""
        return [(name, src, kind, entry, why)
                for name, w in sorted(self.watches.items())
                for src, st in w.sources.items()
                for kind, (entry, why) in sorted(st.refused.items())]

    # -- persistence --------------------------------------------------------------------

    def _load(self) -> tuple[dict[str, dict[str, dict[str, Any]]], float]:
        """service -> source -> kind -> encoded part (decoded when the service is watched)."""
        try:
            data = msgpack.unpackb(read_trusted(self.state_path), raw=False)
            if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
                raise ValueError("not a meshd fleet state file of a known format")
            saved = {str(service): {str(source): {kind: raw for kind, raw in parts.items()
                                                  if kind in PART_KINDS}
                                    for source, parts in by_source.items()}
                     for service, by_source in data["services"].items()}
            return saved, float(data["saved_at"])
        except FileNotFoundError:
            return {}, 0.0
        except (OSError, ValueError, KeyError, TypeError, AttributeError,
                msgpack.UnpackException) as e:
            log.warning("ignoring persisted fleet policies %s: %s", self.state_path, e)
            return {}, 0.0

    def _schedule_save(self) -> None:
        if self._save_pending:
            return
        self._save_pending = True
        delay = max(0.0, SAVE_INTERVAL - (time.monotonic() - self._last_save))
        gevent.spawn_later(delay, self._save)

    def _save(self) -> None:
        self._save_pending = False
        self._last_save = time.monotonic()
        merged = dict(self.saved)
        for name, w in self.watches.items():
            good = {src: dict(st.encoded) for src, st in w.sources.items()
                    if st.synced and not st.stale}
            if any(good.values()) or name in merged:
                # Answered: what the sources hold now (an entry deleted is deleted here
                # too); a source not heard from keeps what was saved for it.
                kept = dict(merged.get(name, {}))
                kept.update(good)
                merged[name] = {s: p for s, p in kept.items() if p}
        merged = {k: v for k, v in merged.items() if v}
        data = {"format": STATE_FORMAT, "saved_at": time.time(),
                "services": merged}
        try:
            write_atomic(self.state_path, bytes(msgpack.packb(data, use_bin_type=True)))
            self.saved = merged
            self.saved_at = time.time()
        except OSError as e:
            log.warning("cannot persist fleet policies to %s: %s", self.state_path, e)

    def close(self) -> None:
        for source in self.sources.values():
            try:
                source.close()
            except Exception as e:
                log.warning("closing config source: %s", e)

    # -- reporting ----------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """``/config``'s ``fleet``: per service, the effective parts and where each came
        from, what the file overrides, refused entries; per source, its health."""
        now = time.time()
        services = {}
        for name, w in sorted(self.watches.items()):
            policy = self.policies.get(name)
            entry: dict[str, Any] = {
                "effective": {kind: {"from": self.origins[name][kind],
                                     "value": _json(getattr(policy, kind))}
                              for kind in PART_KINDS
                              if policy is not None and getattr(policy, kind) is not None},
                "sources": {src: {"synced": st.synced, "stale": st.stale, "error": st.error,
                                  "errors_total": st.errors_total,
                                  "last_update_age_s": round(now - st.last_update, 3)
                                  if st.last_update else None,
                                  "refused": {k: {"entry": e, "reason": why}
                                              for k, (e, why) in st.refused.items()}}
                            for src, st in w.sources.items()},
            }
            if name in self.local_routes:
                entry["effective"]["routes"] = {"from": "file", "value": "[[route]] tables"}
            if name in self.overridden:
                entry["overridden_by_file"] = self.overridden[name]
            if name in self.inbound:   # which policies each inbound listener applies
                entry["authz_listeners"] = {
                    lst.name: "file: [[authorization]]" if lst.name in self.local_authz
                    else "fleet" for lst in self.cfg.listeners
                    if lst.direction == "inbound" and lst.service == name}
            services[name] = entry
        return {
            "version": self.version,
            "published_version": self.published_version,
            "precedence": "the file wins for a service it names: [[route]] host -> routes "
                          "and split; [service.NAME] -> resolver; [[authorization]] naming "
                          "a listener -> that listener's authorization",
            "sources": {src.name: {"plugin": src.plugin,
                                   "distribution": self.describe_source(src.name),
                                   "error": self.source_errors.get(src.name),
                                   "watches": len(self.watches)}
                        for src in self.cfg.config_sources},
            "services": services,
            "persisted": {"path": self.state_path, "saved_at": self.saved_at or None},
        }

    def ready_detail(self) -> list[str]:
        """Lines /ready adds (meshd stays ready: it routes with the last good parts)."""
        out = []
        refused = self.refused()
        for name, src, kind, entry, why in refused[:READY_NAMES]:
            out.append(f"fleet: refused {entry} (source {src}, {kind} of {name}): {why}; "
                       "the last good version applies" + (
                           " (a policy never applied denies every request)"
                           if kind == "authz" else ""))
        if len(refused) > READY_NAMES:
            out.append(f"fleet: and {len(refused) - READY_NAMES} more refused entries")
        return out

    def prometheus(self) -> Iterable[str]:
        rows = [(name, src, st) for name, w in sorted(self.watches.items())
                for src, st in w.sources.items()]
        yield "# HELP meshd_fleet_watches Services whose fleet policy is watched, per config source."
        yield "# TYPE meshd_fleet_watches gauge"
        for cs in self.cfg.config_sources:
            yield f'meshd_fleet_watches{{source="{_esc(cs.name)}"}} {len(self.watches)}'
        yield "# HELP meshd_fleet_policies Services with a fleet policy in effect."
        yield "# TYPE meshd_fleet_policies gauge"
        yield f"meshd_fleet_policies {len(self.policies)}"
        yield "# HELP meshd_fleet_refused_total Entries refused."
        yield "# TYPE meshd_fleet_refused_total counter"
        yield f"{REFUSED} {COUNTERS.value(REFUSED)}"
        yield ("# HELP meshd_fleet_refused_entries 1 while an entry is refused (the last good "
               "version of its kind applies).")
        yield "# TYPE meshd_fleet_refused_entries gauge"
        for name, src, kind, entry, _why in self.refused():
            yield (f'meshd_fleet_refused_entries{{service="{_esc(name)}",source="{_esc(src)}",'
                   f'kind="{kind}",entry="{_esc(entry)}"}} 1')
        yield "# HELP meshd_fleet_stale 1 while a service's policy comes from the persisted state or a failing watch."
        yield "# TYPE meshd_fleet_stale gauge"
        for name, src, st in rows:
            stale = int(st.stale or st.error is not None)
            yield f'meshd_fleet_stale{{service="{_esc(name)}",source="{_esc(src)}"}} {stale}'
        yield "# HELP meshd_fleet_errors_total Failed config-source watches."
        yield "# TYPE meshd_fleet_errors_total counter"
        for name, src, _st in rows:
            counter = _errors_name(name, src)
            yield f"{counter} {COUNTERS.value(counter)}"
        yield "# HELP meshd_fleet_last_update_timestamp_seconds When a config source last updated a service."
        yield "# TYPE meshd_fleet_last_update_timestamp_seconds gauge"
        for name, src, st in rows:
            yield (f'meshd_fleet_last_update_timestamp_seconds{{service="{_esc(name)}",'
                   f'source="{_esc(src)}"}} {st.last_update:.3f}')


def _json(part: Any) -> Any:
    from meshd.control.config_view import to_json
    return to_json(part)


# Counters kept in the region's control tables (meshd.control.counters), by their name.
REFUSED = "meshd_fleet_refused_total"


def _errors_name(service: str, source: str) -> str:
    return f'meshd_fleet_errors_total{{service="{_esc(service)}",source="{_esc(source)}"}}'


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
