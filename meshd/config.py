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
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

from meshd.balance.ewma import DECAY, DEFAULT_RTT
from meshd.config_access_log import AccessLogConfig, access_log
from meshd.config_env import expand_env
from meshd.config_fleet import ConfigSourceConfig, config_source
from meshd.config_identity import (
    AuthorizationConfig,
    IdentityConfig,
    ListenerTlsConfig,
    authorizations,
    check_authorizations,
    identity,
    listener_mtls,
    listener_tls,
    resolve_listeners,
)
from meshd.config_table import (
    Problems,
    Table,
    array,
    boolean,
    choice,
    default,
    duration,
    integer,
    show,
    string,
    string_list,
)
from meshd.config_table import parse_duration as parse_duration  # plugins use meshd.config's
from meshd.config_tracing import TracingConfig, tracing
from meshd.cpus import usable_cpus
from meshd.errors import ConfigError
from meshd.private_files import default_shm_dir
from meshd.proto.detect import DEFAULT_OPAQUE_PORTS

log = logging.getLogger("meshd.config")
T = TypeVar("T")

MAX_WORKERS = 128
DEFAULT_MAX_WATCHES = 100  # per discovery source
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_SERVICE_NAME = re.compile(r"[A-Za-z0-9_.@-]+")
_HOST = re.compile(r"[A-Za-z0-9_.-]+")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_METHOD = re.compile(r"[A-Z]+")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
# "grpc": a gRPC answer whose grpc-status is not 0 (OK), in its trailers or a
# trailers-only head (meshd.proto.grpc_status)
FAILURE_KINDS = ("connect", "reset", "timeout", "5xx", "4xx", "grpc")
DEFAULT_FAILURE_ON = frozenset(("connect", "reset", "timeout", "5xx", "grpc"))


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
    # inbound: "off" | "permissive" (mTLS from peers, plaintext still served and counted)
    # | "strict" (mTLS only); meshd.config_identity decides the default
    mtls: str = "off"
    tls: ListenerTlsConfig | None = None  # [listener.tls]: TLS for ordinary clients


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
    # a peer meshd (meshed endpoint) quiet this long/2 while streams wait gets a PING; no
    # answer within it: no new streams there, retry-safe waiting ones go elsewhere (0: off)
    ping_timeout: float = 1.0


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
    # A process not yet serving may be silent this long (imports on a loaded machine),
    # and a new generation has this long to serve; worker_timeout applies once it serves.
    boot_timeout: float = 60.0
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
    identity: IdentityConfig | None = None        # [identity]
    authorization: tuple[AuthorizationConfig, ...] = ()
    access_log: AccessLogConfig | None = None     # [access_log]; None: no access log
    config_sources: tuple[ConfigSourceConfig, ...] = ()  # [[config_source]], in file order
    tracing: TracingConfig | None = None          # [tracing]; None: no tracing

    def route_services(self) -> list[str]:
        """Services that routes and failover lists name (watched from the start)."""
        names: dict[str, None] = {}
        for route in self.routes:
            names.update(dict.fromkeys(b.service for b in route.backends))
            names.update(dict.fromkeys(route.failover or ()))
        for svc in self.services.values():
            names.update(dict.fromkeys(svc.failover))
        return list(names)


def parse_address(value: object) -> Address:
    """An ``Address`` from "host:port" or "[ipv6]:port"; port 0 means any free port."""
    expected = f'expected "host:port" (IPv6 as "[::1]:port"), got {show(value)}'
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
    top = Table(data, "", problems)
    workers = top.take("workers", _workers, _workers("auto"))
    drain_timeout = top.field(Config, "drain_timeout", duration(0.0))
    shutdown_delay = top.field(Config, "shutdown_delay", duration(0.0))
    worker_timeout = top.field(Config, "worker_timeout", duration(1.0))
    boot_timeout = top.field(Config, "boot_timeout", duration(1.0))
    state_dir = top.field(Config, "state_dir", string())
    # No safe default (non-root without $RUNTIME_DIRECTORY or $XDG_RUNTIME_DIR) is "":
    # `meshd run` then asks for shm_dir (meshd.private_files.prepare_dir).
    shm_dir = top.take("shm_dir", string(), default_shm_dir(env, os.geteuid()))
    instance = top.field(Config, "instance", string(_NAME))
    metric_rows = top.field(Config, "metric_rows", integer(16, 1_000_000))
    endpoint_rows = top.field(Config, "endpoint_rows", integer(16, 1_000_000))
    discovery_wait = top.field(Config, "discovery_wait", duration(0.0))
    service_idle_expiry = top.field(Config, "service_idle_expiry", duration(1.0))
    log_level = top.field(Config, "log_level", choice("debug", "info", "warning", "error"))
    discovery_negative_ttl = top.field(Config, "discovery_negative_ttl", duration(0.1))
    admin = _admin(Table(top.raw("admin"), "admin", problems))
    discovery = tuple(_discovery(t) for t in array(top, "discovery", required=False))
    fleet = tuple(config_source(t) for t in array(top, "config_source", required=False))
    ident = identity(top.raw("identity", None), problems)
    alog = access_log(top.raw("access_log", None), problems)
    traces = tracing(top.raw("tracing", None), instance, problems)
    read = [_listener(t) for t in array(top, "listener", required=True)]
    listeners = resolve_listeners(tuple(lst for lst, _ in read), [m for _, m in read], ident,
                                  problems)
    services = _services(top.raw("service"), problems, check_files)
    routes = tuple(_route(t, i) for i, t in enumerate(array(top, "route", required=False)))
    limits = _limits(Table(top.raw("limits"), "limits", problems))
    bt = Table(top.raw("balancer"), "balancer", problems)
    balancer = BalancerConfig(
        ewma_decay=bt.field(BalancerConfig, "ewma_decay", duration()),
        default_rtt=bt.field(BalancerConfig, "default_rtt", duration()))
    bt.finish()
    policies = authorizations(top)
    top.finish()

    _check_unique("discovery", [d.name for d in discovery], problems)
    _check_unique("config_source", [c.name for c in fleet], problems)
    _check_unique("listener", [lst.name for lst in listeners], problems)
    _check_unique("route", [r.name for r in routes], problems)
    names = {lst.name for lst in listeners}
    for i, route in enumerate(routes):
        if route.listener is not None and route.listener not in names:
            problems.append((f"route[{i}].listener", f"no [[listener]] is named {route.listener!r}"))
    _check_addresses(admin, listeners, problems)
    _check_tunnel_ports(admin, listeners, problems)
    check_authorizations(policies, listeners, routes, problems)
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
                  worker_timeout=worker_timeout, boot_timeout=boot_timeout, state_dir=state_dir, shm_dir=shm_dir,
                  instance=instance, metric_rows=metric_rows, endpoint_rows=endpoint_rows,
                  discovery_wait=discovery_wait, service_idle_expiry=service_idle_expiry,
                  admin=admin, discovery=discovery, listeners=listeners, services=services,
                  limits=limits, balancer=balancer, routes=routes, shutdown_delay=shutdown_delay,
                  log_level=log_level, discovery_negative_ttl=discovery_negative_ttl,
                  identity=ident, authorization=policies, access_log=alog,
                  config_sources=fleet, tracing=traces)


# -- sections -------------------------------------------------------------------------------

def _admin(t: Table) -> AdminConfig:
    admin = AdminConfig(
        listen=t.field(AdminConfig, "listen", parse_address),
        probe_listen=t.field(AdminConfig, "probe_listen", parse_address))
    t.finish()
    return admin


def _discovery(t: Table) -> DiscoveryConfig:
    name = t.take("name", string(_NAME), "", required=True)
    plugin = t.take("plugin", string(), "", required=True)
    max_watches = t.field(DiscoveryConfig, "max_watches", integer(1, 100_000))
    return DiscoveryConfig(name=name, plugin=plugin, options=MappingProxyType(t.rest()),
                           max_watches=max_watches)


def _listener(t: Table) -> tuple[ListenerConfig, str | None]:
    """The listener, and its ``mtls`` as written (``resolve_listeners`` decides it)."""
    def ports(value: object) -> frozenset[int]:
        if not isinstance(value, list):
            raise ValueError(f"expected a list of ports (integers 1..65535), got {show(value)}")
        for i, port in enumerate(value):
            if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
                raise ValueError(f"expected a list of ports (integers 1..65535), got {port!r} "
                                 f"at [{i}]")
            if port in value[:i]:
                raise ValueError(f"port {port} is listed twice")
        return frozenset(value)

    name = t.take("name", string(_NAME), "", required=True)
    listen = t.take("listen", parse_address, Address("", 0), required=True)
    direction = t.field(ListenerConfig, "direction", choice("outbound", "inbound"))
    listener = ListenerConfig(
        name=name,
        listen=listen,
        direction=direction,
        protocol=t.field(ListenerConfig, "protocol", choice("auto", "http", "tcp")),
        service=t.field(ListenerConfig, "service", string(_SERVICE_NAME)),
        forward=t.field(ListenerConfig, "forward", parse_address),
        backlog=t.field(ListenerConfig, "backlog", integer(1, 65535)),
        max_connections=t.field(ListenerConfig, "max_connections", integer(1)),
        h2c_upgrade=t.field(ListenerConfig, "h2c_upgrade", boolean),
        opaque_ports=(default(ListenerConfig, "opaque_ports")
                      if (given := t.take("opaque_ports", ports, None)) is None else given),
        forwarded=t.take("forwarded", choice("replace", "append", "keep"),
                         "replace" if direction == "inbound"
                         else default(ListenerConfig, "forwarded")),
        tunnel_ports=(default(ListenerConfig, "tunnel_ports")
                      if (tunnels := t.take("tunnel_ports", ports, None)) is None else tunnels),
        tls=listener_tls(t),
    )
    mtls = listener_mtls(t)
    t.finish()
    if given is not None and listener.protocol != "auto" and "protocol" not in t.bad:
        t.problem("opaque_ports", f'only a protocol = "auto" listener detects protocols; this '
                                  f'one is "{listener.protocol}" and never looks at ports')
    if "direction" in t.bad:
        return listener, mtls  # the rules below would only echo the bad direction
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
    return listener, mtls


def _services(raw: object, problems: Problems,
              check_files: bool = True) -> Mapping[str, ServiceConfig]:
    services: dict[str, ServiceConfig] = {}
    table = Table(raw, "service", problems)
    for name, value in table.rest().items():
        t = Table(value, f"service.{name}", problems)
        if not _SERVICE_NAME.fullmatch(name):
            problems.append((f"service.{name}",
                             f"a service name must match {_SERVICE_NAME.pattern}, got {name!r}"))
        timeout = t.field(ServiceConfig, "timeout", duration())
        connect_timeout = t.field(ServiceConfig, "connect_timeout", duration())
        idle_timeout = t.field(ServiceConfig, "idle_timeout", duration())
        ping_timeout = t.field(ServiceConfig, "ping_timeout", duration(0.0))
        shares = _source_shares(t, f"service.{name}.discovery")
        balancer = t.field(ServiceConfig, "balancer",
                           choice("p2c", "round_robin", "consistent_hash"))
        failure_accrual = t.field(ServiceConfig, "failure_accrual", integer(0, 1000))
        retries = t.field(ServiceConfig, "retries", integer(0, 10))
        try_timeout = t.field(ServiceConfig, "try_timeout", duration())
        failure_on = t.field(ServiceConfig, "failure_on", _failure_kinds)
        failover: tuple[str, ...] = t.field(ServiceConfig, "failover", _service_list)
        hash_on = t.field(ServiceConfig, "hash_on", _hash_on)
        max_pending = t.field(ServiceConfig, "max_pending", integer(0))
        max_connections = t.field(ServiceConfig, "max_connections", integer(0))
        protocol = t.field(ServiceConfig, "protocol", choice("http1", "h2"))
        tls = _service_tls(t, name, protocol, check_files)
        t.finish()
        if name in failover:
            t.problem("failover", f"a service cannot fail over to itself ({name!r})")
        services[name] = ServiceConfig(
            name=name, timeout=timeout, connect_timeout=connect_timeout,
            idle_timeout=idle_timeout, ping_timeout=ping_timeout,
            discovery=shares[0].source if shares else None,
            sources=shares, balancer=balancer, failure_accrual=failure_accrual,
            retries=retries, try_timeout=try_timeout, failure_on=failure_on,
            failover=failover, hash_on=hash_on, max_pending=max_pending,
            max_connections=max_connections, protocol=protocol, tls=tls,
        )
    return MappingProxyType(services)


def _service_tls(service: Table, name: str, protocol: str,
                 check_files: bool = True) -> TlsConfig | None:
    """`[service.NAME.tls]`: None when absent or `enabled = false`. Its files are loaded
    here (``meshd.tls``, the standard ssl module) so that a bad one is a config error."""
    raw = service.raw("tls", None)
    if raw is None:
        return None
    t = Table(raw, f"{service.path}.tls", service.problems)
    before = len(t.problems)
    enabled = t.take("enabled", boolean, True)
    tls = TlsConfig(ca_file=t.field(TlsConfig, "ca_file", string()),
                    server_name=t.field(TlsConfig, "server_name", _server_name),
                    verify=t.field(TlsConfig, "verify", boolean),
                    cert_file=t.field(TlsConfig, "cert_file", string()),
                    key_file=t.field(TlsConfig, "key_file", string()))
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
        raise ValueError(f"expected a host name or IP address, got {show(value)}")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    labels = value.rstrip(".").split(".")
    if len(value) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"expected a host name or IP address, got {value!r}")
    return value


def _route(t: Table, i: int) -> RouteConfig:
    name = t.take("name", string(_NAME), f"route{i}")
    host = t.take("host", string(_SERVICE_NAME), "", required=True)
    listener = t.field(RouteConfig, "listener", string(_NAME))
    path_prefix = t.field(RouteConfig, "path_prefix", _path_prefix)
    path_regex = t.field(RouteConfig, "path_regex", _regex)
    methods: frozenset[str] = t.field(RouteConfig, "methods", _methods)
    headers: tuple[tuple[str, str], ...] = t.field(RouteConfig, "headers", _header_matches)
    backends = _backends(t)
    failover = t.field(RouteConfig, "failover", _service_list)
    timeout = t.field(RouteConfig, "timeout", duration())
    try_timeout = t.field(RouteConfig, "try_timeout", duration())
    connect_timeout = t.field(RouteConfig, "connect_timeout", duration())
    idle_timeout = t.field(RouteConfig, "idle_timeout", duration())
    retries = t.field(RouteConfig, "retries", integer(0, 10))
    retryable = t.field(RouteConfig, "retryable", boolean)
    t.finish()
    return RouteConfig(name=name, host=host, listener=listener, path_prefix=path_prefix,
                       path_regex=path_regex, methods=methods, headers=headers,
                       backends=backends, failover=failover, timeout=timeout,
                       try_timeout=try_timeout, connect_timeout=connect_timeout,
                       idle_timeout=idle_timeout, retries=retries, retryable=retryable)


def _backends(t: Table) -> tuple[Backend, ...]:
    """`service = "name"` (one backend), or `backends = [{ service, weight }, ...]`."""
    single = t.take("service", string(_SERVICE_NAME), None)
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
        bt = Table(item, f"{t.path}.backends[{j}]", t.problems)
        service = bt.take("service", string(_SERVICE_NAME), "", required=True)
        weight = bt.field(Backend, "weight", integer(0, 1_000_000))
        bt.finish()
        if service:
            backends.append(Backend(service, weight))
    if backends and sum(b.weight for b in backends) == 0:
        t.problem("backends", "at least one backend needs a weight above 0")
    if len({b.service for b in backends}) != len(backends):
        t.problem("backends", "a service is listed twice")
    return tuple(backends)


def _source_shares(t: Table, path: str) -> tuple[SourceShare, ...]:
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
        item_table = Table(item, f"{path}[{i}]", t.problems)
        source = item_table.take("source", string(_NAME), "", required=True)
        share = item_table.take("share", integer(1, 100), 0, required=True)
        item_table.finish()
        if source and share:
            shares.append(SourceShare(source, share))
    if len(shares) == len(raw) and sum(s.share for s in shares) != 100:
        t.problem("discovery", f"shares must add up to 100, got {sum(s.share for s in shares)}")
    if len({s.source for s in shares}) != len(shares):
        t.problem("discovery", "a source is listed twice")
    return tuple(shares)


def _limits(t: Table) -> LimitsConfig:
    limits = LimitsConfig(
        header_bytes=t.field(LimitsConfig, "header_bytes", integer(1024)),
        request_line_bytes=t.field(LimitsConfig, "request_line_bytes", integer(256)),
        header_count=t.field(LimitsConfig, "header_count", integer(1)),
        header_read_timeout=t.field(LimitsConfig, "header_read_timeout", duration()),
        client_idle_timeout=t.field(LimitsConfig, "client_idle_timeout", duration()),
        detect_timeout=t.field(LimitsConfig, "detect_timeout", duration()),
        h2_max_concurrent_streams=t.field(LimitsConfig, "h2_max_concurrent_streams",
                                          integer(1, 10000)),
        h2_max_resets=t.field(LimitsConfig, "h2_max_resets", integer(1)),
        tcp_idle_timeout=t.field(LimitsConfig, "tcp_idle_timeout", duration()),
        write_timeout=t.field(LimitsConfig, "write_timeout", duration()),
    )
    t.finish()
    return limits


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

def _service_list(value: object) -> tuple[str, ...]:
    names = string_list(value, "service names")
    for name in names:
        if not _SERVICE_NAME.fullmatch(name):
            raise ValueError(f"a service name must match {_SERVICE_NAME.pattern}, got {name!r}")
    if len(set(names)) != len(names):
        raise ValueError("a service is listed twice")
    return tuple(names)


def _failure_kinds(value: object) -> frozenset[str]:
    kinds = string_list(value, "failure kinds")
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
    raise ValueError(f'expected "client_address" or "header:NAME", got {show(value)}')


def _path_prefix(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f'expected a path starting with "/", got {show(value)}')
    return value


def _regex(value: object) -> re.Pattern[str]:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a regular expression string, got {show(value)}")
    try:
        return re.compile(value)
    except re.error as e:
        raise ValueError(f"invalid regular expression {value!r}: {e}") from None


def _methods(value: object) -> frozenset[str]:
    methods = string_list(value, "methods")
    for m in methods:
        if not _METHOD.fullmatch(m):
            raise ValueError(f"a method is upper-case letters, got {m!r}")
    return frozenset(methods)


def _header_matches(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping):
        raise ValueError(f'expected a table like {{ "x-canary" = "1" }}, got {show(value)}')
    out = []
    for name, v in value.items():
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"invalid header name {name!r}")
        if not isinstance(v, str):
            raise ValueError(f"header {name}: expected a string value, got {show(v)}")
        out.append((name.lower(), v))
    return tuple(out)


def _workers(value: object) -> int:
    if value == "auto":
        return min(usable_cpus(), MAX_WORKERS)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f'expected an integer or "auto", got {show(value)}')
    if not 1 <= value <= MAX_WORKERS:
        raise ValueError(f"must be between 1 and {MAX_WORKERS}, got {value}")
    return value

