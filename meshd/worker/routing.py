"""Routing rules: which service a request goes to, and with which timeouts and retries.

A request names a service (its ``Host``, or the listener's fixed ``service``). The
``[[route]]`` tables naming that service as ``host`` are tried in file order; the first
whose conditions all hold (listener, path prefix, path regex, method, exact header
values) decides the backend service, drawn by weight with smooth weighted round robin
(exact shares per worker: 90/10 is nine then one, not a coin toss), and may override
the service's timeouts and retry policy. No matching route: the named service itself.

``Policy`` is the outcome, with the backend service's settings filled in; when that
service has no endpoints, the proxy walks ``failover`` in order.

Fleet policies (``meshd.fleet``: Consul config entries, Gateway API routes) come with the
snapshot: ``request_policy`` applies them (``meshd.fleet.select``) to a service that no
local ``[[route]]`` names (the control process already dropped the parts the file
overrides; a service whose fleet routes reject what none of them match gets a
``Policy`` with ``reject`` set, answered 404), and the resolver of the chosen service
(subset labels, failover, connect timeout) whichever way it was chosen. A matching
fleet route's filters ride on the ``Policy`` (``rewrite``) to the client side.

Pure code over the config and the policies (no sockets): the worker builds one ``Router``
per config and hands it each new set of policies (``set_fleet``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from meshd import rowkeys
from meshd.balance.p2c import Candidate, RoundRobin
from meshd.config import DEFAULT_FAILURE_ON, DEFAULT_SERVICE, Config, RouteConfig
from meshd.fleet.api import Target
from meshd.fleet.rewrite import Rewrite
from meshd.fleet.select import Labels, Resolved, Selector
from meshd.fleet.wire import Policy as FleetPolicy
from meshd.fleet.wire import unpack

log = logging.getLogger("meshd.worker")


@dataclass(frozen=True, slots=True)
class Policy:
    """How one request is sent: resolved once per request, before the first attempt."""

    service: str               # the backend service (before failover)
    failover: tuple[str, ...]  # tried in order when ``service`` has no endpoints
    timeout: float             # the whole request, retries and backoff included
    try_timeout: float         # one attempt (0: only ``timeout``)
    connect_timeout: float
    idle_timeout: float        # a body that moves no byte this long is abandoned
    retries: int
    retryable: bool            # non-idempotent methods may be retried too
    failure_on: frozenset[str] = DEFAULT_FAILURE_ON
    route: str | None = None   # the matching route's name
    labels: Labels = ()        # fleet subset: only endpoints of ``service`` carrying all of them
    failover_labels: tuple[Labels, ...] = ()   # the same for each of ``failover`` (or empty)
    # A fleet route's filters (meshd.fleet.rewrite), applied to what goes upstream.
    rewrite: Rewrite | None = None
    # Not "": no fleet route matched and the service's routes reject the rest (GAMMA's
    # 404); the reason meshd answers with.
    reject: str = ""
    route_key: str = ""        # the matching route's metric row key (``meshd.rowkeys``)


class _Route:
    __slots__ = ("config", "rr", "candidates", "prefix", "headers", "methods")

    def __init__(self, config: RouteConfig) -> None:
        self.config = config
        self.rr = RoundRobin()
        self.candidates = [Candidate(float(b.weight)) for b in config.backends]
        self.prefix = config.path_prefix.encode("latin-1") if config.path_prefix else None
        self.headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in config.headers]
        self.methods = frozenset(m.encode() for m in config.methods)

    def matches(self, listener: str, method: bytes, path: bytes,
                headers: Sequence[tuple[bytes, bytes]]) -> bool:
        c = self.config
        if c.listener is not None and c.listener != listener:
            return False
        if self.methods and method not in self.methods:
            return False
        if self.prefix is not None and not path.startswith(self.prefix):
            return False
        if c.path_regex is not None and c.path_regex.search(path.decode("latin-1")) is None:
            return False
        for name, value in self.headers:
            if not any(k.lower() == name and v == value for k, v in headers):
                return False
        return True

    def backend(self, host: str) -> str:
        backends = self.config.backends
        if not backends:
            return host
        if len(backends) == 1:
            return backends[0].service
        return backends[self.rr.pick(self.candidates)].service


def route_matcher(config: RouteConfig) -> Callable[[str, bytes, bytes, Sequence[tuple[bytes, bytes]]], bool]:
    """``matches(listener, method, path, headers)`` of a route's conditions alone (its
    ``host`` aside): authorization scopes inbound requests with it (``meshd.authz``)."""
    return _Route(config).matches


MAX_PLAIN_POLICIES = 4096   # services whose route-less Policy a Router keeps


class Router:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._routes: dict[str, list[_Route]] = {}
        for route in config.routes:
            self._routes.setdefault(route.host, []).append(_Route(route))
        # A route's metric row key, made once here rather than per request.
        self._route_keys = {route.name: rowkeys.route_key(route.name) for route in config.routes}
        # The policy of a service reached by no route, made once (it is the config's
        # alone, and frozen). Bounded: the names come from clients' Host fields.
        self._plain: dict[str, Policy] = {}
        self.fleet: Selector | None = None
        self.fleet_version = ""
        self._packed: dict[str, tuple[bytes, FleetPolicy]] = {}

    def set_fleet(self, version: str, packed: Mapping[str, bytes]) -> None:
        """The fleet policies of a newly loaded snapshot: recompiled only when their
        version changed (the weighted picks keep their state across other snapshots),
        unpacking only the policies whose bytes changed."""
        if version == self.fleet_version:
            return
        self.fleet_version = version
        kept: dict[str, tuple[bytes, FleetPolicy]] = {}
        for name, blob in packed.items():
            old = self._packed.get(name)
            if old is not None and old[0] == blob:
                kept[name] = old
                continue
            try:
                kept[name] = (blob, unpack(blob))
            except ValueError as e:   # the control process wrote it: a bug, not input
                log.error("fleet policy of %s unreadable, not applied: %s", name, e)
        self._packed = kept
        self.fleet = (Selector({name: p for name, (_, p) in kept.items()}, self.fleet)
                      if kept else None)

    def local(self, host: str) -> bool:
        """Local ``[[route]]`` tables name ``host`` (then the file decides its routing)."""
        return host in self._routes

    def request_policy(self, listener: str, host: str, method: bytes, target: bytes,
                       headers: Sequence[tuple[bytes, bytes]]) -> Policy:
        """The policy of an outbound request naming ``host``: local routes, else fleet
        routes and splits; then the fleet resolver of the chosen service."""
        fleet = self.fleet
        if fleet is None or (host in self._routes) or host not in fleet:
            service, matched = self.match(listener, host, method, target, headers)
            policy = self.policy(service, matched)
            if fleet is not None and service in fleet:
                return self._resolved(policy, fleet.resolve(Target(service)))
            return policy
        chosen, route, rewrite = fleet.route(host, method, target, headers)
        if route is None:
            entry = fleet.rejects(host)
            if entry is not None:
                return replace(self.policy(host, None),
                               reject=f"no route of {host} matches the request ({entry})")
        resolved = fleet.resolve(chosen)
        policy = self.policy(resolved.service, None)
        if route is not None:
            policy = replace(
                policy,
                timeout=_pick(route.timeout, policy.timeout),
                try_timeout=_pick(route.try_timeout, policy.try_timeout),
                idle_timeout=_pick(route.idle_timeout, policy.idle_timeout),
                retries=policy.retries if route.retries is None else route.retries,
                failure_on=policy.failure_on if route.retry_on is None else route.retry_on,
                route=route.name, rewrite=rewrite,
                route_key=fleet.route_key(host, route))
        return self._resolved(policy, resolved, route is not None and route.timeout is not None)

    @staticmethod
    def _resolved(policy: Policy, r: Resolved, route_timeout: bool = False) -> Policy:
        res = r.resolver
        if res is None:
            return replace(policy, labels=r.labels) if r.labels else policy
        return replace(
            policy,
            failover=tuple(s for s, _ in r.failover),
            failover_labels=tuple(labels for _, labels in r.failover),
            labels=r.labels,
            connect_timeout=_pick(res.connect_timeout, policy.connect_timeout),
            timeout=policy.timeout if route_timeout else _pick(res.timeout, policy.timeout))

    def match(self, listener: str, host: str, method: bytes, target: bytes,
              headers: Sequence[tuple[bytes, bytes]]) -> tuple[str, RouteConfig | None]:
        """(backend service, the route that chose it or None) for a request naming ``host``."""
        routes = self._routes.get(host)
        if routes:
            q = target.find(b"?")
            path = target if q < 0 else target[:q]
            for route in routes:
                if route.matches(listener, method, path, headers):
                    return route.backend(host), route.config
        return host, None

    def policy(self, service: str, route: RouteConfig | None) -> Policy:
        """The settings of a request to ``service``: the route's where it sets them,
        else the service's, else the defaults."""
        if route is None:
            plain = self._plain
            if service in plain:
                return plain[service]
            svc = self.config.services.get(service, DEFAULT_SERVICE)
            policy = Policy(service, svc.failover, svc.timeout, svc.try_timeout,
                            svc.connect_timeout, svc.idle_timeout, svc.retries, False,
                            svc.failure_on)
            if len(plain) < MAX_PLAIN_POLICIES:
                plain[service] = policy
            return policy
        svc = self.config.services.get(service, DEFAULT_SERVICE)
        return Policy(
            service,
            svc.failover if route.failover is None else route.failover,
            _pick(route.timeout, svc.timeout),
            _pick(route.try_timeout, svc.try_timeout),
            _pick(route.connect_timeout, svc.connect_timeout),
            _pick(route.idle_timeout, svc.idle_timeout),
            svc.retries if route.retries is None else route.retries,
            route.retryable,
            svc.failure_on,
            route.name,
            route_key=self._route_keys.get(route.name, ""),
        )


def _pick(override: float | None, default: float) -> float:
    return default if override is None else override
