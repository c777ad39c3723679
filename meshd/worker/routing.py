"""Routing rules: which service a request goes to, and with which timeouts and retries.

A request names a service (its ``Host``, or the listener's fixed ``service``). The
``[[route]]`` tables naming that service as ``host`` are tried in file order; the first
whose conditions all hold (listener, path prefix, path regex, method, exact header
values) decides the backend service, drawn by weight with smooth weighted round robin
(exact shares per worker: 90/10 is nine then one, not a coin toss), and may override
the service's timeouts and retry policy. No matching route: the named service itself.

``Policy`` is the outcome, with the backend service's settings filled in; when that
service has no endpoints, the proxy walks ``failover`` in order.

Pure code over the config (no sockets): the worker builds one ``Router`` per config.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meshd.balance.p2c import Candidate, RoundRobin
from meshd.config import DEFAULT_FAILURE_ON, DEFAULT_SERVICE, Config, RouteConfig


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


class Router:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._routes: dict[str, list[_Route]] = {}
        for route in config.routes:
            self._routes.setdefault(route.host, []).append(_Route(route))

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
        svc = self.config.services.get(service, DEFAULT_SERVICE)
        if route is None:
            return Policy(service, svc.failover, svc.timeout, svc.try_timeout,
                          svc.connect_timeout, svc.idle_timeout, svc.retries, False,
                          svc.failure_on)
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
        )


def _pick(override: float | None, default: float) -> float:
    return default if override is None else override
