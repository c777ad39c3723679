"""The config: a TOML file read once into frozen dataclasses.

This module owns the file's schema, its defaults and every rule a config must satisfy.
``load`` (or ``parse``, from an already-read dict) validates everything at once and
raises one ``ConfigError`` carrying all problems, each with its key path
(``listener[1].listen``, ``service.web.timeout``), so ``meshd check`` shows them together.
A reload builds a new ``Config``; nothing here is ever mutated after load.

Unknown keys are errors at every level, except beside ``name`` and ``plugin`` in a
``[[discovery]]`` table: those keys belong to the plugin and are handed over in
``DiscoveryConfig.options`` for the plugin to validate (meshd keeps ``max_watches``).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields
from types import MappingProxyType
from typing import Any, TypeVar

from meshd.balance.ewma import DECAY, DEFAULT_RTT
from meshd.config_env import expand_env
from meshd.cpus import usable_cpus
from meshd.errors import ConfigError
from meshd.private_files import default_shm_dir
from meshd.proto.detect import DEFAULT_OPAQUE_PORTS

log = logging.getLogger("meshd.config")
T = TypeVar("T")
Problems = list[tuple[str, str]]

MAX_WORKERS = 128
DEFAULT_MAX_WATCHES = 100  # per discovery source
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_SERVICE_NAME = re.compile(r"[A-Za-z0-9_.@-]+")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_HOST = re.compile(r"[A-Za-z0-9_.-]+")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_METHOD = re.compile(r"[A-Z]+")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
FAILURE_KINDS = ("connect", "reset", "timeout", "5xx", "4xx")
DEFAULT_FAILURE_ON = frozenset(("connect", "reset", "timeout", "5xx"))


@dataclass(frozen=True, slots=True)
class Address:
    host: str  # without brackets
    port: int  # 0: the kernel picks a free port

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: Address = Address("127.0.0.1", 4191)
    # a second listener serving only /live and /ready, for probes from outside the pod
    # (kubelet on the pod IP) without exposing /endpoints, /metrics... there
    probe_listen: Address | None = None


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    name: str
    plugin: str  # entry-point name in the group meshd.discovery
    options: Mapping[str, Any]  # the plugin's own keys, read-only
    # Watches of this source at once; past it the least recently used watch of a name
    # the source does not know is stopped (a Consul agent allows 200 connections a client).
    max_watches: int = DEFAULT_MAX_WATCHES


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    listen: Address
    direction: str = "outbound"  # | "inbound"
    protocol: str = "auto"  # | "http" | "tcp"
    service: str | None = None  # fixed destination service (outbound tcp needs one)
    forward: Address | None = None  # the local application (inbound only)
    backlog: int = 1024
    max_connections: int = 10000  # per worker
    # pass `Upgrade: h2c` on to the upstream (then tunnel after its 101) instead of
    # stripping it; meshd itself speaks HTTP/2 with prior knowledge, never via h2c
    h2c_upgrade: bool = False
    # auto listeners: original destination ports proxied as opaque TCP without detection
    # (server-speaks-first protocols)
    opaque_ports: frozenset[int] = DEFAULT_OPAQUE_PORTS
    # a client's X-Forwarded-For / Forwarded (meshd.proto.forwarded): "replace" with the
    # peer's address, "append" it, or "keep" them; default replace inbound, keep outbound
    forwarded: str = "keep"
    # auto inbound listeners: the ports of the forward host a peer meshd may open with
    # MESHD-TUNNEL (meshd-to-meshd opaque TCP); any other port is refused. Empty: none.
    tunnel_ports: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class SourceShare:
    source: str
    share: int  # percent, 1..100


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """`[service.NAME.tls]`: the service's endpoints are reached over TLS (client side;
    the context is built by ``meshd.tls.client_context``)."""
    ca_file: str | None = None      # PEM CA bundle; None: the system trust store
    server_name: str | None = None  # SNI and the name verified; None: the endpoint's host
    verify: bool = True             # False: no verification at all (warned at load)
    cert_file: str | None = None    # client certificate (PEM), presented when asked
    key_file: str | None = None     # its private key (PEM)


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    name: str
    timeout: float = 10.0  # the response head must arrive within it, else 504
    connect_timeout: float = 2.0
    idle_timeout: float = 60.0  # max idle of a pooled upstream keep-alive connection
    discovery: str | None = None  # a [[discovery]] name; None: the first that knows it
    # Several sources with their share of traffic in percent (a migration): the
    # endpoints of each source together get that share. Empty: just `discovery`.
    sources: tuple[SourceShare, ...] = ()
    balancer: str = "p2c"  # p2c (peak-EWMA, shared by all workers) | round_robin | consistent_hash
    failure_accrual: int = 7  # consecutive failures that eject an endpoint; 0: never
    retries: int = 1  # retries of a failed replayable request, within the budget
    try_timeout: float = 0.0  # one attempt's limit (0: only `timeout`, which spans retries)
    failure_on: frozenset[str] = DEFAULT_FAILURE_ON  # what counts as a failed attempt
    failover: tuple[str, ...] = ()  # services tried in order when this one has no endpoints
    hash_on: str = "client_address"  # consistent_hash key: client_address | header:NAME
    max_pending: int = 0  # in-flight requests per endpoint over all workers (0: no limit)
    max_connections: int = 0  # upstream connections in use per endpoint, all workers (0: none)
    protocol: str = "http1"  # toward the endpoints: http1 | h2 (prior knowledge); gRPC is always h2
    tls: TlsConfig | None = None  # None: plaintext (meshed endpoints are always plaintext h2c)


DEFAULT_SERVICE = ServiceConfig(name="")  # a service the config does not name


@dataclass(frozen=True, slots=True)
class Backend:
    service: str
    weight: int = 1


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """One `[[route]]`: requests naming `host` that match every given condition go to
    `backends` (weighted), with the route's own timeouts and retry policy."""
    name: str
    host: str  # the service the request names (Host header, or the listener's service)
    listener: str | None = None  # only requests on this listener
    path_prefix: str | None = None
    path_regex: re.Pattern[str] | None = None
    methods: frozenset[str] = frozenset()  # empty: any
    headers: tuple[tuple[str, str], ...] = ()  # (lower-case name, exact value)
    backends: tuple[Backend, ...] = ()  # empty: the service `host` itself
    failover: tuple[str, ...] | None = None  # None: each backend's service failover
    timeout: float | None = None  # None here and below: the backend service's setting
    try_timeout: float | None = None
    connect_timeout: float | None = None
    idle_timeout: float | None = None
    retries: int | None = None
    retryable: bool = False  # retry non-idempotent methods too (the upstream tolerates it)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    header_bytes: int = 65536
    request_line_bytes: int = 8192
    header_count: int = 100
    header_read_timeout: float = 10.0
    client_idle_timeout: float = 60.0
    detect_timeout: float = 1.0
    h2_max_concurrent_streams: int = 100  # per HTTP/2 connection (SETTINGS)
    h2_max_resets: int = 200  # streams a client may reset within 10 s (Rapid Reset)
    tcp_idle_timeout: float = 3600.0  # an opaque/tunneled connection with no bytes either way
    write_timeout: float = 60.0  # a client that accepts no bytes this long is dropped


@dataclass(frozen=True, slots=True)
class BalancerConfig:                      # table [balancer], all optional
    ewma_decay: float = DECAY              # peak-EWMA time constant (Linkerd2, Finagle: 10 s)
    default_rtt: float = DEFAULT_RTT       # cost of an endpoint with no sample yet (30 ms)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole file. The defaults here are the config's defaults (``parse`` reads them
    from the fields), except two that depend on the machine: ``workers`` ("auto": the
    usable CPUs) and ``shm_dir`` (``meshd.private_files.default_shm_dir``)."""
    path: str  # the file it came from; "" when parsed from a dict
    workers: int
    drain_timeout: float = 30.0
    worker_timeout: float = 30.0
    state_dir: str = "/var/lib/meshd"
    shm_dir: str  # private (0700) directory of the region, snapshots, control sockets
    instance: str = "meshd"  # names the shm file
    metric_rows: int = 1024  # rows of per-service counters in shared memory
    endpoint_rows: int = 4096  # rows of per-endpoint balancer state in shared memory
    discovery_wait: float = 1.0  # a first request for a service not yet watched waits this long
    service_idle_expiry: float = 600.0  # an on-demand watch without requests this long is dropped
    admin: AdminConfig = AdminConfig()
    discovery: tuple[DiscoveryConfig, ...] = ()
    listeners: tuple[ListenerConfig, ...]
    services: Mapping[str, ServiceConfig]  # read-only
    limits: LimitsConfig = LimitsConfig()
    balancer: BalancerConfig = BalancerConfig()
    routes: tuple[RouteConfig, ...] = ()  # in file order; the first match wins
    # on TERM, listeners keep accepting this long before the drain starts (a pod's
    # application still calls out through meshd while it shuts down)
    shutdown_delay: float = 0.0
    log_level: str = "info"  # debug | info | warning | error; applied again on HUP
    # An on-demand watch that found no such service, or only failed, is dropped this long
    # after it started (a negative cache): made-up names must not hold watches.
    discovery_negative_ttl: float = 5.0

    def route_services(self) -> list[str]:
        """Services that routes and failover lists name (watched from the start)."""
        names: dict[str, None] = {}
        for route in self.routes:
            names.update(dict.fromkeys(b.service for b in route.backends))
            names.update(dict.fromkeys(route.failover or ()))
        for svc in self.services.values():
            names.update(dict.fromkeys(svc.failover))
        return list(names)


def parse_duration(value: object) -> float:
    """Seconds from "250ms", "10s", "1.5s", "5m" or "1h"; a unit is required."""
    if not isinstance(value, str):
        raise ValueError(f'expected a duration string with a unit like "10s" or "250ms", '
                         f"got {_show(value)}")
    match = _DURATION.fullmatch(value)
    if match is None:
        raise ValueError(f'expected a duration with a unit (ms, s, m, h) like "10s", got {value!r}')
    return float(match[1]) * _UNIT_SECONDS[match[2]]


def parse_address(value: object) -> Address:
    """An ``Address`` from "host:port" or "[ipv6]:port"; port 0 means any free port."""
    expected = f'expected "host:port" (IPv6 as "[::1]:port"), got {_show(value)}'
    if not isinstance(value, str):
        raise ValueError(expected)
    host, sep, port = value.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit():
        raise ValueError(expected)
    if host.startswith("[") and host.endswith("]"):
        try:  # normalised, so "[0::1]" and "[::1]" are the same listen address
            host = str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise ValueError(f"not an IPv6 address in {value!r}") from None
    elif not _HOST.fullmatch(host):
        raise ValueError(expected)
    if int(port) > 65535:
        raise ValueError(f"port must be 0..65535, got {port}")
    return Address(host, int(port))


def load(path: str, environ: Mapping[str, str] | None = None, *, text: bytes | None = None,
         check_files: bool = True) -> Config:
    """Read, parse and validate the TOML file at ``path``; raise ``ConfigError`` if invalid.
    ``environ`` (default: this process's) gives ``${VAR}`` values and the default shm_dir.
    ``text``: the file's bytes, already read (so that two checks see the same file).
    ``check_files``: load the TLS files through ssl (see :func:`parse`)."""
    try:
        if text is None:
            with open(path, "rb") as f:
                text = f.read()
        data = tomllib.loads(text.decode())
    except OSError as e:
        raise ConfigError([("", f"cannot read: {e.strerror or e}")], path) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError([("", f"invalid TOML: {e}")], path) from None
    return parse(data, path, environ, check_files=check_files)


def parse(data: Mapping[str, Any], path: str = "",
          environ: Mapping[str, str] | None = None, *, check_files: bool = True) -> Config:
    """Validate an already-read TOML document; raise ``ConfigError`` with every problem.

    ``check_files=False`` skips loading ``[service.NAME.tls]`` files through ssl: the
    master parses so, after ``meshd.validate.load_checked`` had them checked in a
    child, because a process that forks gevent workers must not import ssl itself."""
    env = os.environ if environ is None else environ
    problems: Problems = []
    data = expand_env(data, problems, env)
    env_problems = len(problems)
    unexpanded = {key for key, _ in problems}  # their values' own checks would only echo
    top = _Table(data, "", problems)
    workers = top.take("workers", _workers, _workers("auto"))
    drain_timeout = top.field(Config, "drain_timeout", _duration(0.0))
    shutdown_delay = top.field(Config, "shutdown_delay", _duration(0.0))
    worker_timeout = top.field(Config, "worker_timeout", _duration(1.0))
    state_dir = top.field(Config, "state_dir", _string())
    # No safe default (non-root without $RUNTIME_DIRECTORY or $XDG_RUNTIME_DIR) is "":
    # `meshd run` then asks for shm_dir (meshd.private_files.prepare_dir).
    shm_dir = top.take("shm_dir", _string(), default_shm_dir(env, os.geteuid()))
    instance = top.field(Config, "instance", _string(_NAME))
    metric_rows = top.field(Config, "metric_rows", _integer(16, 1_000_000))
    endpoint_rows = top.field(Config, "endpoint_rows", _integer(16, 1_000_000))
    discovery_wait = top.field(Config, "discovery_wait", _duration(0.0))
    service_idle_expiry = top.field(Config, "service_idle_expiry", _duration(1.0))
    log_level = top.field(Config, "log_level", _choice("debug", "info", "warning", "error"))
    discovery_negative_ttl = top.field(Config, "discovery_negative_ttl", _duration(0.1))
    admin = _admin(_Table(top.raw("admin"), "admin", problems))
    discovery = tuple(_discovery(t) for t in _array(top, "discovery", required=False))
    listeners = tuple(_listener(t) for t in _array(top, "listener", required=True))
    services = _services(top.raw("service"), problems, check_files)
    routes = tuple(_route(t, i) for i, t in enumerate(_array(top, "route", required=False)))
    limits = _limits(_Table(top.raw("limits"), "limits", problems))
    bt = _Table(top.raw("balancer"), "balancer", problems)
    balancer = BalancerConfig(
        ewma_decay=bt.field(BalancerConfig, "ewma_decay", _duration()),
        default_rtt=bt.field(BalancerConfig, "default_rtt", _duration()))
    bt.finish()
    top.finish()

    _check_unique("discovery", [d.name for d in discovery], problems)
    _check_unique("listener", [lst.name for lst in listeners], problems)
    _check_unique("route", [r.name for r in routes], problems)
    names = {lst.name for lst in listeners}
    for i, route in enumerate(routes):
        if route.listener is not None and route.listener not in names:
            problems.append((f"route[{i}].listener", f"no [[listener]] is named {route.listener!r}"))
    _check_addresses(admin, listeners, problems)
    _check_tunnel_ports(admin, listeners, problems)
    sources = {d.name for d in discovery}
    for service in services.values():
        for i, share in enumerate(service.sources):
            if share.source not in sources:
                key = (f"service.{service.name}.discovery" if len(service.sources) == 1
                       else f"service.{service.name}.discovery[{i}].source")
                problems.append((key, f"no [[discovery]] source is named {share.source!r}"))
    problems[env_problems:] = [p for p in problems[env_problems:] if p[0] not in unexpanded]
    if problems:
        raise ConfigError(problems, path)
    return Config(path=path, workers=workers, drain_timeout=drain_timeout,
                  worker_timeout=worker_timeout, state_dir=state_dir, shm_dir=shm_dir,
                  instance=instance, metric_rows=metric_rows, endpoint_rows=endpoint_rows,
                  discovery_wait=discovery_wait, service_idle_expiry=service_idle_expiry,
                  admin=admin, discovery=discovery, listeners=listeners, services=services,
                  limits=limits, balancer=balancer, routes=routes, shutdown_delay=shutdown_delay,
                  log_level=log_level, discovery_negative_ttl=discovery_negative_ttl)


# -- sections -------------------------------------------------------------------------------

def _admin(t: _Table) -> AdminConfig:
    admin = AdminConfig(
        listen=t.field(AdminConfig, "listen", parse_address),
        probe_listen=t.field(AdminConfig, "probe_listen", parse_address))
    t.finish()
    return admin


def _discovery(t: _Table) -> DiscoveryConfig:
    name = t.take("name", _string(_NAME), "", required=True)
    plugin = t.take("plugin", _string(), "", required=True)
    max_watches = t.field(DiscoveryConfig, "max_watches", _integer(1, 100_000))
    return DiscoveryConfig(name=name, plugin=plugin, options=MappingProxyType(t.rest()),
                           max_watches=max_watches)


def _listener(t: _Table) -> ListenerConfig:
    def ports(value: object) -> frozenset[int]:
        if not isinstance(value, list):
            raise ValueError(f"expected a list of ports (integers 1..65535), got {_show(value)}")
        for i, port in enumerate(value):
            if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
                raise ValueError(f"expected a list of ports (integers 1..65535), got {port!r} "
                                 f"at [{i}]")
            if port in value[:i]:
                raise ValueError(f"port {port} is listed twice")
        return frozenset(value)

    name = t.take("name", _string(_NAME), "", required=True)
    listen = t.take("listen", parse_address, Address("", 0), required=True)
    direction = t.field(ListenerConfig, "direction", _choice("outbound", "inbound"))
    listener = ListenerConfig(
        name=name,
        listen=listen,
        direction=direction,
        protocol=t.field(ListenerConfig, "protocol", _choice("auto", "http", "tcp")),
        service=t.field(ListenerConfig, "service", _string(_SERVICE_NAME)),
        forward=t.field(ListenerConfig, "forward", parse_address),
        backlog=t.field(ListenerConfig, "backlog", _integer(1, 65535)),
        max_connections=t.field(ListenerConfig, "max_connections", _integer(1)),
        h2c_upgrade=t.field(ListenerConfig, "h2c_upgrade", _boolean),
        opaque_ports=(_default(ListenerConfig, "opaque_ports")
                      if (given := t.take("opaque_ports", ports, None)) is None else given),
        forwarded=t.take("forwarded", _choice("replace", "append", "keep"),
                         "replace" if direction == "inbound"
                         else _default(ListenerConfig, "forwarded")),
        tunnel_ports=(_default(ListenerConfig, "tunnel_ports")
                      if (tunnels := t.take("tunnel_ports", ports, None)) is None else tunnels),
    )
    t.finish()
    if given is not None and listener.protocol != "auto" and "protocol" not in t.bad:
        t.problem("opaque_ports", f'only a protocol = "auto" listener detects protocols; this '
                                  f'one is "{listener.protocol}" and never looks at ports')
    if "direction" in t.bad:
        return listener  # the rules below would only echo the bad direction
    if tunnels is not None and listener.direction == "outbound":
        t.problem("tunnel_ports", "only an inbound listener accepts meshd tunnels (to ports "
                                  "of its forward host); an outbound one never does")
    elif tunnels is not None and listener.protocol != "auto" and "protocol" not in t.bad:
        t.problem("tunnel_ports", f'only a protocol = "auto" listener reads a meshd tunnel '
                                  f'header; this one is "{listener.protocol}"')
    if listener.direction == "inbound" and listener.forward is None and "forward" not in t.bad:
        t.problem("forward", "required for an inbound listener (the local application)")
    if listener.direction == "outbound" and listener.forward is not None:
        t.problem("forward", "only an inbound listener forwards; an outbound one routes "
                             "by service")
    if (listener.direction == "outbound" and listener.protocol == "tcp"
            and listener.service is None and "service" not in t.bad):
        t.problem("service", "required for an outbound tcp listener (the destination service)")
    return listener


def _services(raw: object, problems: Problems,
              check_files: bool = True) -> Mapping[str, ServiceConfig]:
    services: dict[str, ServiceConfig] = {}
    table = _Table(raw, "service", problems)
    for name, value in table.rest().items():
        t = _Table(value, f"service.{name}", problems)
        if not _SERVICE_NAME.fullmatch(name):
            problems.append((f"service.{name}",
                             f"a service name must match {_SERVICE_NAME.pattern}, got {name!r}"))
        timeout = t.field(ServiceConfig, "timeout", _duration())
        connect_timeout = t.field(ServiceConfig, "connect_timeout", _duration())
        idle_timeout = t.field(ServiceConfig, "idle_timeout", _duration())
        shares = _source_shares(t, f"service.{name}.discovery")
        balancer = t.field(ServiceConfig, "balancer",
                           _choice("p2c", "round_robin", "consistent_hash"))
        failure_accrual = t.field(ServiceConfig, "failure_accrual", _integer(0, 1000))
        retries = t.field(ServiceConfig, "retries", _integer(0, 10))
        try_timeout = t.field(ServiceConfig, "try_timeout", _duration())
        failure_on = t.field(ServiceConfig, "failure_on", _failure_kinds)
        failover: tuple[str, ...] = t.field(ServiceConfig, "failover", _service_list)
        hash_on = t.field(ServiceConfig, "hash_on", _hash_on)
        max_pending = t.field(ServiceConfig, "max_pending", _integer(0))
        max_connections = t.field(ServiceConfig, "max_connections", _integer(0))
        protocol = t.field(ServiceConfig, "protocol", _choice("http1", "h2"))
        tls = _service_tls(t, name, protocol, check_files)
        t.finish()
        if name in failover:
            t.problem("failover", f"a service cannot fail over to itself ({name!r})")
        services[name] = ServiceConfig(
            name=name, timeout=timeout, connect_timeout=connect_timeout,
            idle_timeout=idle_timeout, discovery=shares[0].source if shares else None,
            sources=shares, balancer=balancer, failure_accrual=failure_accrual,
            retries=retries, try_timeout=try_timeout, failure_on=failure_on,
            failover=failover, hash_on=hash_on, max_pending=max_pending,
            max_connections=max_connections, protocol=protocol, tls=tls,
        )
    return MappingProxyType(services)


def _service_tls(service: _Table, name: str, protocol: str,
                 check_files: bool = True) -> TlsConfig | None:
    """`[service.NAME.tls]`: None when absent or `enabled = false`. Its files are loaded
    here (``meshd.tls``, the standard ssl module) so that a bad one is a config error."""
    raw = service.raw("tls", None)
    if raw is None:
        return None
    t = _Table(raw, f"{service.path}.tls", service.problems)
    before = len(t.problems)
    enabled = t.take("enabled", _boolean, True)
    tls = TlsConfig(ca_file=t.field(TlsConfig, "ca_file", _string()),
                    server_name=t.field(TlsConfig, "server_name", _server_name),
                    verify=t.field(TlsConfig, "verify", _boolean),
                    cert_file=t.field(TlsConfig, "cert_file", _string()),
                    key_file=t.field(TlsConfig, "key_file", _string()))
    t.finish()
    if (tls.cert_file is None) != (tls.key_file is None):
        given, missing = ("cert_file", "key_file") if tls.key_file is None else ("key_file",
                                                                                 "cert_file")
        if given not in t.bad:
            t.problem(missing, f"required with {given} (a client certificate needs its key)")
    if not enabled or not t.ok or t.bad & {"enabled", "ca_file", "cert_file", "key_file"}:
        return None
    if not check_files:  # checked (and warned about) in a child: see parse
        return tls
    from meshd.tls import TlsSetupError, client_context  # ssl stays out of the sans-IO import
    try:
        client_context(tls, protocol)
    except TlsSetupError as e:
        t.problem(e.key, str(e))
    if len(t.problems) > before:
        return None
    if not tls.verify:
        log.warning("service.%s.tls.verify = false: the certificates of %s's endpoints are "
                    "not verified (anyone on the path can impersonate them)", name, name)
    return tls


def _server_name(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a host name or IP address, got {_show(value)}")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    labels = value.rstrip(".").split(".")
    if len(value) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"expected a host name or IP address, got {value!r}")
    return value


def _route(t: _Table, i: int) -> RouteConfig:
    name = t.take("name", _string(_NAME), f"route{i}")
    host = t.take("host", _string(_SERVICE_NAME), "", required=True)
    listener = t.field(RouteConfig, "listener", _string(_NAME))
    path_prefix = t.field(RouteConfig, "path_prefix", _path_prefix)
    path_regex = t.field(RouteConfig, "path_regex", _regex)
    methods: frozenset[str] = t.field(RouteConfig, "methods", _methods)
    headers: tuple[tuple[str, str], ...] = t.field(RouteConfig, "headers", _header_matches)
    backends = _backends(t)
    failover = t.field(RouteConfig, "failover", _service_list)
    timeout = t.field(RouteConfig, "timeout", _duration())
    try_timeout = t.field(RouteConfig, "try_timeout", _duration())
    connect_timeout = t.field(RouteConfig, "connect_timeout", _duration())
    idle_timeout = t.field(RouteConfig, "idle_timeout", _duration())
    retries = t.field(RouteConfig, "retries", _integer(0, 10))
    retryable = t.field(RouteConfig, "retryable", _boolean)
    t.finish()
    return RouteConfig(name=name, host=host, listener=listener, path_prefix=path_prefix,
                       path_regex=path_regex, methods=methods, headers=headers,
                       backends=backends, failover=failover, timeout=timeout,
                       try_timeout=try_timeout, connect_timeout=connect_timeout,
                       idle_timeout=idle_timeout, retries=retries, retryable=retryable)


def _backends(t: _Table) -> tuple[Backend, ...]:
    """`service = "name"` (one backend), or `backends = [{ service, weight }, ...]`."""
    single = t.take("service", _string(_SERVICE_NAME), None)
    raw = t.raw("backends", None)
    if raw is None:
        return (Backend(single, 1),) if single else ()
    if single is not None:
        t.problem("service", "give either service or backends, not both")
    if not isinstance(raw, list) or not raw:
        t.problem("backends", 'expected a list of { service = "...", weight = N }')
        return ()
    backends = []
    for j, item in enumerate(raw):
        bt = _Table(item, f"{t.path}.backends[{j}]", t.problems)
        service = bt.take("service", _string(_SERVICE_NAME), "", required=True)
        weight = bt.field(Backend, "weight", _integer(0, 1_000_000))
        bt.finish()
        if service:
            backends.append(Backend(service, weight))
    if backends and sum(b.weight for b in backends) == 0:
        t.problem("backends", "at least one backend needs a weight above 0")
    if len({b.service for b in backends}) != len(backends):
        t.problem("backends", "a service is listed twice")
    return tuple(backends)


def _source_shares(t: _Table, path: str) -> tuple[SourceShare, ...]:
    """`discovery = "name"`, or `discovery = [{ source = "a", share = 90 }, ...]` with
    shares in percent adding up to 100."""
    raw = t.raw("discovery", None)
    if raw is None:
        return ()
    if isinstance(raw, str):
        if not _NAME.fullmatch(raw):
            t.problem("discovery", f"a source name must match {_NAME.pattern}, got {raw!r}")
            return ()
        return (SourceShare(raw, 100),)
    if not isinstance(raw, list) or not raw:
        t.problem("discovery", 'expected a source name or a list of { source = "...", share = N }')
        return ()
    shares = []
    for i, item in enumerate(raw):
        item_table = _Table(item, f"{path}[{i}]", t.problems)
        source = item_table.take("source", _string(_NAME), "", required=True)
        share = item_table.take("share", _integer(1, 100), 0, required=True)
        item_table.finish()
        if source and share:
            shares.append(SourceShare(source, share))
    if len(shares) == len(raw) and sum(s.share for s in shares) != 100:
        t.problem("discovery", f"shares must add up to 100, got {sum(s.share for s in shares)}")
    if len({s.source for s in shares}) != len(shares):
        t.problem("discovery", "a source is listed twice")
    return tuple(shares)


def _limits(t: _Table) -> LimitsConfig:
    limits = LimitsConfig(
        header_bytes=t.field(LimitsConfig, "header_bytes", _integer(1024)),
        request_line_bytes=t.field(LimitsConfig, "request_line_bytes", _integer(256)),
        header_count=t.field(LimitsConfig, "header_count", _integer(1)),
        header_read_timeout=t.field(LimitsConfig, "header_read_timeout", _duration()),
        client_idle_timeout=t.field(LimitsConfig, "client_idle_timeout", _duration()),
        detect_timeout=t.field(LimitsConfig, "detect_timeout", _duration()),
        h2_max_concurrent_streams=t.field(LimitsConfig, "h2_max_concurrent_streams",
                                          _integer(1, 10000)),
        h2_max_resets=t.field(LimitsConfig, "h2_max_resets", _integer(1)),
        tcp_idle_timeout=t.field(LimitsConfig, "tcp_idle_timeout", _duration()),
        write_timeout=t.field(LimitsConfig, "write_timeout", _duration()),
    )
    t.finish()
    return limits


def _default(cls: type, name: str) -> Any:
    """The default of field ``name`` of config dataclass ``cls``: each default is written
    once, on the dataclass, and ``parse`` takes it from there."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            break
    raise KeyError(f"{cls.__name__}.{name} has no default")


def _array(top: _Table, key: str, required: bool) -> list[_Table]:
    """The tables of an array of tables (``[[key]]``), each reading under ``key[i]``."""
    raw = top.raw(key, [])
    if not isinstance(raw, list):
        top.problem(key, f"expected an array of tables ([[{key}]]), got {_show(raw)}")
        return []
    if required and not raw:
        top.problem(key, f"at least one [[{key}]] is required")
    return [_Table(item, f"{key}[{i}]", top.problems) for i, item in enumerate(raw)]


# -- cross-checks ---------------------------------------------------------------------------

def _check_unique(section: str, names: list[str], problems: Problems) -> None:
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if name and name in first:  # "" is a missing name, reported already
            problems.append((f"{section}[{i}].name",
                             f"duplicate name {name!r} (also {section}[{first[name]}])"))
        first.setdefault(name, i)


def _check_addresses(admin: AdminConfig, listeners: tuple[ListenerConfig, ...],
                     problems: Problems) -> None:
    """Two sockets may not bind the same port, and a wildcard host overlaps every host
    of its family (IPv6 sockets are bound V6ONLY, so "::" leaves IPv4 alone)."""
    taken: list[tuple[Address, str]] = [(admin.listen, "the admin address")]
    probe = admin.probe_listen
    if probe is not None and probe.port and _overlap(probe, admin.listen):
        problems.append(("admin.probe_listen", f"{probe} clashes with the admin address "
                                               f"{admin.listen}"))
    elif probe is not None and probe.port:
        taken.append((probe, "admin.probe_listen"))
    for i, listener in enumerate(listeners):
        addr = listener.listen
        if not addr.host or addr.port == 0:
            continue  # missing (reported already) or a fresh port picked by the kernel
        for other, owner in taken:
            if _overlap(addr, other):
                problems.append((f"listener[{i}].listen", f"{addr} clashes with {owner} {other}"))
                break
        taken.append((addr, f"listener[{i}]"))


def _check_tunnel_ports(admin: AdminConfig, listeners: tuple[ListenerConfig, ...],
                        problems: Problems) -> None:
    """A tunnel port may not be one of meshd's own (a listener's or the admin port) when
    the forward host may be this meshd: a tunnel would then reach the outbound listener,
    and through it every service, or the admin API. (Listeners on port 0 are checked
    when a tunnel arrives, ``meshd.worker.client.auto``.)"""
    own = [(admin.listen, "admin address")]
    if admin.probe_listen is not None:
        own.append((admin.probe_listen, "probe address"))
    own += [(lst.listen, f"listener {lst.name!r}") for lst in listeners]
    for i, listener in enumerate(listeners):
        if listener.forward is None:
            continue
        for port in sorted(listener.tunnel_ports):
            for addr, owner in own:
                if addr.port == port and may_reach(listener.forward.host, addr):
                    problems.append((f"listener[{i}].tunnel_ports",
                                     f"port {port} is meshd's own {owner} {addr}: a tunnel to "
                                     f"{Address(listener.forward.host, port)} would reach "
                                     f"meshd itself"))
                    break


def may_reach(host: str, bound: Address) -> bool:
    """Whether a connection to ``host`` (at ``bound``'s port) may reach a socket bound to
    ``bound``: the same address, a wildcard bind of its family, or a name (it may resolve
    to anything, this host included)."""
    try:
        target = ipaddress.ip_address(host)
        local = ipaddress.ip_address(bound.host)
    except ValueError:
        return True
    target = _unmapped(target)
    local = _unmapped(local)
    if target.is_unspecified:  # connecting to 0.0.0.0 / :: reaches this host
        return True
    if local.is_unspecified:
        return target.version == local.version
    return target == local


def _unmapped(addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
              ) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _overlap(a: Address, b: Address) -> bool:
    if a.port != b.port or a.family != b.family:
        return False
    return a.host == b.host or a.host in ("0.0.0.0", "::") or b.host in ("0.0.0.0", "::")


# -- the table reader and its converters ----------------------------------------------------

class _Table:
    """One TOML table being read: each known key is taken once, what is left is unknown.

    A value that fails its converter is reported under its key path and replaced by the
    default, so reading goes on and every problem of the file is collected in one pass.
    """

    def __init__(self, data: object, path: str, problems: Problems) -> None:
        self.path = path
        self.problems = problems
        self.bad: set[str] = set()  # keys that were missing or invalid
        self.ok = isinstance(data, Mapping)
        self._left: dict[str, Any] = dict(data) if isinstance(data, Mapping) else {}
        if not self.ok:
            problems.append((path, f"expected a table, got {_show(data)}"))

    def take(self, key: str, convert: Callable[[object], T], default: T,
             required: bool = False) -> T:
        if key not in self._left:
            if required and self.ok:
                self.problem(key, "required")
            return default
        try:
            return convert(self._left.pop(key))
        except ValueError as e:
            self.problem(key, str(e))
            return default

    def field(self, cls: type, key: str, convert: Callable[[object], T]) -> T:
        """``take`` with the default of ``cls``'s dataclass field named ``key``."""
        return self.take(key, convert, _default(cls, key))

    def raw(self, key: str, default: object = MappingProxyType({})) -> object:
        """Take a value as it is (a sub-table, read by its own ``_Table``)."""
        return self._left.pop(key, default)

    def problem(self, key: str, message: str) -> None:
        self.bad.add(key)
        self.problems.append((f"{self.path}.{key}" if self.path else key, message))

    def rest(self) -> dict[str, Any]:
        """Hand over the keys not taken (for tables whose other keys belong to someone else)."""
        left, self._left = self._left, {}
        return left

    def finish(self) -> None:
        for key in self.rest():
            self.problem(key, "unknown key")


def _show(value: object) -> str:
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_show(value)}")
    return value


def _string_list(value: object, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"expected a list of {what}, got {_show(value)}")
    return value


def _service_list(value: object) -> tuple[str, ...]:
    names = _string_list(value, "service names")
    for name in names:
        if not _SERVICE_NAME.fullmatch(name):
            raise ValueError(f"a service name must match {_SERVICE_NAME.pattern}, got {name!r}")
    if len(set(names)) != len(names):
        raise ValueError("a service is listed twice")
    return tuple(names)


def _failure_kinds(value: object) -> frozenset[str]:
    kinds = _string_list(value, "failure kinds")
    for kind in kinds:
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown failure kind {kind!r}; expected some of "
                             + ", ".join(FAILURE_KINDS))
    return frozenset(kinds)


def _hash_on(value: object) -> str:
    if value == "client_address":
        return value
    if isinstance(value, str) and value.startswith("header:") and _HEADER_NAME.fullmatch(value[7:]):
        return "header:" + value[7:].lower()
    raise ValueError(f'expected "client_address" or "header:NAME", got {_show(value)}')


def _path_prefix(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f'expected a path starting with "/", got {_show(value)}')
    return value


def _regex(value: object) -> re.Pattern[str]:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a regular expression string, got {_show(value)}")
    try:
        return re.compile(value)
    except re.error as e:
        raise ValueError(f"invalid regular expression {value!r}: {e}") from None


def _methods(value: object) -> frozenset[str]:
    methods = _string_list(value, "methods")
    for m in methods:
        if not _METHOD.fullmatch(m):
            raise ValueError(f"a method is upper-case letters, got {m!r}")
    return frozenset(methods)


def _header_matches(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping):
        raise ValueError(f'expected a table like {{ "x-canary" = "1" }}, got {_show(value)}')
    out = []
    for name, v in value.items():
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"invalid header name {name!r}")
        if not isinstance(v, str):
            raise ValueError(f"header {name}: expected a string value, got {_show(v)}")
        out.append((name.lower(), v))
    return tuple(out)


def _workers(value: object) -> int:
    if value == "auto":
        return min(usable_cpus(), MAX_WORKERS)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f'expected an integer or "auto", got {_show(value)}')
    if not 1 <= value <= MAX_WORKERS:
        raise ValueError(f"must be between 1 and {MAX_WORKERS}, got {value}")
    return value


def _integer(low: int, high: int | None = None) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):  # True is not 1 here
            raise ValueError(f"expected an integer, got {_show(value)}")
        if high is None and value < low:
            raise ValueError(f"must be at least {low}, got {value}")
        if high is not None and not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value
    return convert


def _duration(minimum: float = 0.001) -> Callable[[object], float]:
    def convert(value: object) -> float:
        seconds = parse_duration(value)
        if seconds < minimum:
            shown = f"{minimum:g}s" if minimum >= 1 or minimum == 0 else f"{minimum * 1000:g}ms"
            raise ValueError(f"must be at least {shown}, got {value!r}")
        return seconds
    return convert


def _string(pattern: re.Pattern[str] | None = None) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {_show(value)}")
        if not value:
            raise ValueError("must not be empty")
        if pattern is not None and not pattern.fullmatch(value):
            raise ValueError(f"must match {pattern.pattern}, got {value!r}")
        return value
    return convert


def _choice(*options: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        for option in options:
            if value == option:
                return option
        shown = ", ".join(f'"{o}"' for o in options)
        raise ValueError(f"expected one of {shown}, got {_show(value)}")
    return convert
