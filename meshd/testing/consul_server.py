"""A Consul HTTP API test server: the part of the API a discovery plugin reads, answered
the way Consul documents it, in a thread on loopback.

    server = ConsulServer().start()
    server.register("web", address="127.0.0.1", port=8081, tags=["prod"])
    ... Backend("consul", {"address": server.url}) ...
    server.set_health(instance_id, "critical")
    server.stop(); server.restart()          # an outage, then the agent back on its port

Served: ``GET /v1/health/service/<name>`` (``passing``, ``tag`` and ``node-meta``
repeatable, ``dc``, ``index`` + ``wait`` blocking queries), ``GET /v1/catalog/services``
(``dc``, blocking), ``PUT /v1/agent/service/register`` and
``PUT /v1/agent/service/deregister/<id>``. Answers carry ``X-Consul-Index``,
``X-Consul-KnownLeader`` and ``X-Consul-LastContact``.

Connect (``meshd.testing.consul_connect`` holds its state): ``GET
/v1/agent/connect/ca/roots`` and ``GET /v1/agent/connect/ca/leaf/<service>`` (both
blocking), ``POST /v1/agent/connect/authorize``, ``PUT|GET|DELETE
/v1/connect/intentions/exact?source=&destination=``. Controls:
``rotate_ca(reissue=, cross_sign=)``, ``reissue_leaves()``, ``prune_roots()``,
``set_intention(src, dst, action)``, ``delete_intention``, ``default_policy`` ("allow" |
"deny" | None: allow unless ACLs are on; Consul's ACL default policy) and
``set_fault("error" | "hang" | None, prefix=)`` for the agent failing (500) or hanging on
the Connect endpoints (``hanging`` counts the requests held). The leaf needs
``service:write`` (a ``"write"`` token), as authorize does; roots need no token.

The index model: one raft index; every mutation bumps it and stamps the service it
touched; a health query reports its service's index (the catalog index for a service
never seen). A blocking query (``index`` > 0) returns once that index exceeds ``index``
or ``wait`` (default 5m, capped at 10m, plus up to wait/16 of jitter) has passed.
``set_index(n)`` forces every index to ``n`` (a snapshot restore) and, as Consul
abandons its state store then, makes blocked queries return at once.

ACL (``acl={"token": "read" | "write" | "deny"}``): the token comes from
``X-Consul-Token``, ``Authorization: Bearer`` or ``?token=``; an unknown token gets 403
"ACL not found"; a token without read permission sees list results filtered (empty, with
``X-Consul-Results-Filtered-By-ACLs: true``), as Consul filters reads; a write without
``write`` gets 403 "Permission denied". No token means the anonymous token ("deny").
``"read:PREFIX"`` is a token scoped to services named PREFIX... (Consul's
``service_prefix "PREFIX" { policy = "read" }``): the health of another service is 403
"Permission denied", and ``catalog/services`` lists only the matching ones (filtered).

Config entries (``meshd.testing.consul_config`` holds their state and index model):
``PUT /v1/config`` (``consul config write``; ``cas``), ``GET /v1/config/<kind>/<name>``
(blocking on the config table's index; 404 with ``X-Consul-Index`` when absent),
``GET /v1/config/<kind>``, ``DELETE /v1/config/<kind>/<name>`` (``cas``). Controls:
``write_config(entry)``, ``delete_config(kind, name)``, ``config_entry(kind, name)``.
Writes need a ``"write"`` token when ACLs are on (Consul: ``operator:write`` or the
service's ``service:write``).

Every request is recorded in ``requests`` for assertions (method, path, query params,
token, body); ``blocked`` / ``max_blocked`` count the blocking queries waiting now / at most at
once, ``connections`` / ``max_connections`` the client connections open (what an agent's
``limits.http_max_conns_per_client`` would count). Fault knobs: ``fail_next(n, status, body)``, ``set_index(n)``, ``stop()`` /
``restart()`` (connections in flight are cut, state is kept).
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import select
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from meshd.testing.consul_config import ConfigEntryError, ConfigStore
from meshd.testing.consul_connect import DEFAULT_LEAF_TTL, Connect, ConnectError

MAX_WAIT = 600.0
DEFAULT_WAIT = 300.0
HANGUP_CHECK = 0.2   # a blocked query looks for its client having hung up this often
ROOTS = "/v1/agent/connect/ca/roots"
LEAF = "/v1/agent/connect/ca/leaf/"
_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass
class Instance:
    """One registered service instance and the node it runs on."""

    id: str
    service: str
    port: int
    address: str = ""                 # Service.Address; "" -> clients use Node.Address
    node: str = "node1"
    node_address: str = "127.0.0.1"
    node_meta: dict[str, str] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=lambda: {"Passing": 1, "Warning": 1})
    status: str = "passing"           # of the service check: passing | warning | critical
    datacenter: str = "dc1"
    create_index: int = 0
    modify_index: int = 0
    checks: list[dict[str, Any]] = field(default_factory=list)  # as registered (lower-case keys)

    def entry(self) -> dict[str, Any]:
        """Its ``/v1/health/service`` entry (field names and types as Consul's docs)."""
        idx = {"CreateIndex": self.create_index, "ModifyIndex": self.modify_index}
        node_id = str(uuid.uuid5(uuid.NAMESPACE_DNS, self.node))
        return {
            "Node": {"ID": node_id, "Node": self.node, "Address": self.node_address,
                     "Datacenter": self.datacenter,
                     "TaggedAddresses": {"lan": self.node_address, "wan": self.node_address},
                     "Meta": dict(self.node_meta), **idx},
            "Service": {"ID": self.id, "Service": self.service, "Tags": list(self.tags),
                        "Address": self.address, "TaggedAddresses": {},
                        "Meta": dict(self.meta), "Port": self.port,
                        "Weights": dict(self.weights), "EnableTagOverride": False,
                        "Datacenter": self.datacenter, **idx},
            "Checks": [
                {"Node": self.node, "CheckID": "serfHealth", "Name": "Serf Health Status",
                 "Status": "passing", "Notes": "", "Output": "Agent alive and reachable",
                 "ServiceID": "", "ServiceName": "", "ServiceTags": [], "Type": "", **idx},
                {"Node": self.node, "CheckID": f"service:{self.id}",
                 "Name": f"Service '{self.service}' check", "Status": self.status,
                 "Notes": "", "Output": "", "ServiceID": self.id, "ServiceName": self.service,
                 "ServiceTags": list(self.tags), "Type": "ttl", **idx},
            ],
        }


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    params: dict[str, list[str]]
    token: str | None
    at: float
    body: bytes = b""

    def param(self, name: str) -> str | None:
        values = self.params.get(name)
        return values[-1] if values else None


class ConsulServer:
    def __init__(self, port: int = 0, host: str = "127.0.0.1", datacenter: str = "dc1",
                 datacenters: Iterable[str] = ("dc1", "dc2"),
                 acl: Mapping[str, str] | None = None, leaf_ttl: float = DEFAULT_LEAF_TTL,
                 default_policy: str | None = None, cluster_id: str = "") -> None:
        self.host = host
        self.port = port
        self.datacenter = datacenter
        self.datacenters = set(datacenters) | {datacenter}
        self.acl: dict[str, str] | None = dict(acl) if acl is not None else None
        self.requests: list[Request] = []
        self._cond = threading.Condition()
        self._instances: dict[str, Instance] = {}
        self._index = 1
        self._service_index: dict[str, int] = {}
        self._abandoned = 0
        self._failures: list[tuple[int, str]] = []
        self._running = False
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self.blocked = 0
        self.max_blocked = 0
        self.max_connections = 0
        self.default_policy = default_policy
        self._fault: tuple[str, str, int, str] | None = None   # mode, prefix, status, body
        self.hanging = 0
        self.config = ConfigStore()
        with self._cond:
            self.connect = Connect(datacenter, lambda: self._bump(), leaf_ttl, cluster_id)

    @property
    def connections(self) -> int:
        with self._cond:
            return len(self._conns)

    # -- life ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ConsulServer:
        server = self

        class Httpd(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def process_request(self, request: Any, client_address: Any) -> None:
                with server._cond:
                    server._conns.add(request)
                    server.max_connections = max(server.max_connections, len(server._conns))
                super().process_request(request, client_address)

            def shutdown_request(self, request: Any) -> None:
                with server._cond:
                    server._conns.discard(request)
                super().shutdown_request(request)

        self._httpd = Httpd((self.host, self.port), _handler(self))
        self.port = self._httpd.server_address[1]
        with self._cond:
            self._running = True
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=f"consul-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """The agent goes away: the listener closes and connections in flight are cut."""
        with self._cond:
            self._running = False
            conns = list(self._conns)
            self._cond.notify_all()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)

    def restart(self) -> ConsulServer:
        """Back on the same port, with the same state."""
        if self._httpd is not None:
            self.stop()
        return self.start()

    def __enter__(self) -> ConsulServer:
        return self.start() if self._httpd is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state -----------------------------------------------------------------------

    def register(self, service: str, port: int, *, id: str | None = None, address: str = "",
                 tags: Iterable[str] = (), meta: Mapping[str, str] | None = None,
                 weights: Mapping[str, int] | None = None, status: str = "passing",
                 node: str = "node1", node_address: str = "127.0.0.1",
                 node_meta: Mapping[str, str] | None = None, datacenter: str | None = None) -> str:
        """Register (or replace) an instance; returns its ID."""
        _check_status(status)
        iid = id or f"{service}-{node}-{port}"
        inst = Instance(iid, service, port, address, node, node_address, dict(node_meta or {}),
                        list(tags), dict(meta or {}),
                        {"Passing": 1, "Warning": 1, **(weights or {})}, status,
                        datacenter or self.datacenter)
        with self._cond:
            old = self._instances.get(iid)
            index = self._bump(service, *([old.service] if old else []))
            inst.create_index = old.create_index if old else index
            inst.modify_index = index
            self._instances[iid] = inst
        return iid

    def deregister(self, instance_id: str) -> None:
        with self._cond:
            old = self._instances.pop(instance_id, None)
            if old is not None:
                self._bump(old.service)

    def set_health(self, instance_id: str, status: str) -> None:
        _check_status(status)
        with self._cond:
            inst = self._instances[instance_id]
            inst.status = status
            inst.modify_index = self._bump(inst.service)

    def touch(self, service: str) -> None:
        """An idempotent write: the index moves, the answer does not."""
        with self._cond:
            self._bump(service)

    def set_index(self, n: int) -> None:
        """Force every index to ``n`` (a raft snapshot restore); blocked queries return."""
        with self._cond:
            self._index = n
            self._service_index = dict.fromkeys(self._service_index, n)
            self.config.index = n
            self._abandoned += 1
            self._cond.notify_all()

    def fail_next(self, n: int = 1, status: int = 500,
                  body: str = "rpc error making call: No cluster leader") -> None:
        with self._cond:
            self._failures.extend([(status, body)] * n)

    # -- config entries --------------------------------------------------------------

    def write_config(self, entry: Mapping[str, Any], cas: int | None = None) -> bool:
        """``consul config write``: create or replace the entry of its Kind and Name."""
        with self._cond:
            return self.config.put(dict(entry), self._bump(), cas)

    def delete_config(self, kind: str, name: str, cas: int | None = None) -> bool:
        with self._cond:
            return self.config.delete(kind, name, self._bump(), cas)

    def config_entry(self, kind: str, name: str) -> dict[str, Any] | None:
        with self._cond:
            return self.config.get(kind, name)

    # -- Connect controls ------------------------------------------------------------

    @property
    def trust_domain(self) -> str:
        return self.connect.trust_domain

    def rotate_ca(self, reissue: bool = True, cross_sign: bool = True) -> str:
        """A CA rotation: a new active root (the old stays listed), cross-signed by the
        old one unless ``cross_sign`` is False; leaves are re-issued under it now, or with
        ``reissue=False`` at ``reissue_leaves()``. Its root ID."""
        with self._cond:
            return self.connect.rotate(reissue, cross_sign).id

    def reissue_leaves(self, services: list[str] | None = None) -> None:
        with self._cond:
            self.connect.reissue(services)

    def prune_roots(self) -> None:
        with self._cond:
            self.connect.prune()

    def set_intention(self, source: str, destination: str, action: str) -> None:
        with self._cond:
            self.connect.set_intention(source, destination, action)

    def delete_intention(self, source: str, destination: str) -> None:
        with self._cond:
            self.connect.delete_intention(source, destination)

    def set_fault(self, mode: str | None, prefix: str = "/v1/agent/connect/",
                  status: int = 500, body: str = "rpc error making call: No cluster leader"
                  ) -> None:
        """Requests under ``prefix`` fail with ``status`` ("error") or hang until the fault
        is cleared, then are answered ("hang"); None clears it."""
        if mode not in (None, "error", "hang"):
            raise ValueError(f"fault mode must be error, hang or None, got {mode!r}")
        with self._cond:
            self._fault = (mode, prefix, status, body) if mode else None
            self._cond.notify_all()

    def _faulted(self, path: str, conn: socket.socket) -> tuple[int, str] | None:
        """Apply the fault to a request: (status, body) to fail it, else None (after a
        hang ends)."""
        with self._cond:
            fault = self._fault
            if fault is None or not path.startswith(fault[1]):
                return None
            if fault[0] == "error":
                return fault[2], fault[3]
            self.hanging += 1
            self._cond.notify_all()
            try:
                while (self._fault is not None and self._fault[0] == "hang"
                       and self._running and not _hung_up(conn)):
                    self._cond.wait(HANGUP_CHECK)
            finally:
                self.hanging -= 1
            return None

    def instances(self) -> list[Instance]:
        with self._cond:
            return list(self._instances.values())

    def requests_to(self, path: str) -> list[Request]:
        with self._cond:
            return [r for r in self.requests if r.path == path]

    def wait_for(self, predicate: Callable[[ConsulServer], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate(self)`` holds (it is re-checked on every request/change)."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self), timeout):
                raise TimeoutError(f"consul test server: condition not met within {timeout}s")

    def _bump(self, *services: str) -> int:
        self._index += 1
        for s in services:
            self._service_index[s] = self._index
        self._cond.notify_all()
        return self._index

    # -- answering (called from handler threads) ----------------------------------

    def _record(self, req: Request) -> tuple[int, str] | None:
        with self._cond:
            self.requests.append(req)
            self._cond.notify_all()
            return self._failures.pop(0) if self._failures else None

    def _acl(self, token: str | None, write: bool) -> tuple[int, str] | bool:
        """(403, body) to refuse; else whether reads are allowed (False: filter them)."""
        if self.acl is None:
            return True
        policy = self.acl.get(token) if token else "deny"
        if policy is None:
            return 403, "ACL not found"
        if write and policy != "write":
            return 403, "Permission denied"
        return policy in ("read", "write") or policy.startswith("read:")

    def _scope(self, token: str | None) -> str | None:
        """The service-name prefix a scoped token may read (None: not scoped)."""
        policy = (self.acl or {}).get(token) if token else None
        return policy.removeprefix("read:") if policy and policy.startswith("read:") else None

    def _blocking(self, params: dict[str, list[str]], index_of: Callable[[], int],
                  conn: socket.socket | None = None) -> tuple[int, str] | int:
        """Block per the query's index/wait; the index to report, or (400, why). A client
        that hangs up ends its query (Consul cancels a request whose client went away)."""
        raw = params.get("index", [""])[-1]
        try:
            min_index = int(raw) if raw else 0
            if min_index < 0:
                raise ValueError
        except ValueError:
            return 400, "Invalid index"
        wait = DEFAULT_WAIT
        if "wait" in params:
            parsed = _parse_go_duration(params["wait"][-1])
            if parsed is None:
                return 400, "Invalid wait time"
            wait = min(parsed, MAX_WAIT)
        with self._cond:
            if min_index > 0:
                deadline = time.monotonic() + wait + random.uniform(0, wait / 16)
                abandoned = self._abandoned
                self.blocked += 1
                self.max_blocked = max(self.max_blocked, self.blocked)
                try:
                    while (index_of() <= min_index and self._abandoned == abandoned
                           and self._running):
                        remaining = deadline - time.monotonic()
                        if remaining <= 0 or (conn is not None and _hung_up(conn)):
                            break
                        self._cond.wait(min(remaining, HANGUP_CHECK))
                finally:
                    self.blocked -= 1
            return index_of()

    def _health(self, name: str, params: dict[str, list[str]], allowed: bool
                ) -> list[dict[str, Any]]:
        dc = params.get("dc", [self.datacenter])[-1] or self.datacenter
        passing = _flag(params, "passing")
        tags = params.get("tag", [])   # all must match, case-insensitively as in Consul
        node_meta = [m.partition(":")[::2] for m in params.get("node-meta", [])]
        with self._cond:
            found = [i for i in self._instances.values() if i.service == name
                     and i.datacenter == dc
                     and all(t.lower() in {x.lower() for x in i.tags} for t in tags)
                     and all(i.node_meta.get(k) == v for k, v in node_meta)
                     and (not passing or i.status == "passing")]
            return [i.entry() for i in sorted(found, key=lambda i: i.id)] if allowed else []

    def _catalog(self, dc: str, allowed: bool) -> dict[str, list[str]]:
        out: dict[str, set[str]] = {}
        with self._cond:
            for i in self._instances.values():
                if i.datacenter == dc:
                    out.setdefault(i.service, set()).update(i.tags)
        return {k: sorted(v) for k, v in sorted(out.items())} if allowed else {}

    def _register_body(self, raw: Mapping[str, Any]) -> str:
        """An agent service definition. Consul decodes its keys case-insensitively
        (py-consul sends "name", "checks", ...)."""
        body = {k.lower(): v for k, v in raw.items()}
        checks = [{k.lower(): v for k, v in c.items()}
                  for c in ([body["check"]] if body.get("check") else []) + list(body.get("checks") or [])]
        weights = {k.capitalize(): int(v) for k, v in (body.get("weights") or {}).items()}
        iid = self.register(
            str(body["name"]), int(body.get("port", 0)), id=str(body.get("id") or body["name"]),
            address=str(body.get("address", "")), tags=list(body.get("tags") or ()),
            meta=dict(body.get("meta") or {}), weights=weights,
            # Consul starts a check critical unless its definition gives a Status.
            status=str(checks[0].get("status", "critical")) if checks else "passing")
        with self._cond:
            self._instances[iid].checks = checks
        return iid


def _handler(server: ConsulServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"   # keep-alive, as Consul's HTTP server does
        scope: str | None = None
        disable_nagle_algorithm = True  # head and body are two writes: no delayed-ACK stall

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._serve("GET")

        def do_PUT(self) -> None:
            self._serve("PUT")

        def do_POST(self) -> None:
            self._serve("POST")

        def do_DELETE(self) -> None:
            self._serve("DELETE")

        def _serve(self, method: str) -> None:
            url = urllib.parse.urlsplit(self.path)
            params = urllib.parse.parse_qs(url.query, keep_blank_values=True)
            token = (self.headers.get("X-Consul-Token")
                     or _bearer(self.headers.get("Authorization"))
                     or params.get("token", [None])[-1])
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            failure = server._record(Request(method, url.path, params, token, time.monotonic(),
                                             body))
            if failure is None:
                failure = server._faulted(url.path, self.connection)
            if failure is not None:
                return self._send(failure[0], failure[1].encode(), "text/plain")
            acl: tuple[int, str] | bool = True
            if url.path != ROOTS:   # the roots are public: Consul asks no token for them
                acl = server._acl(token, write=method != "GET" or url.path.startswith(LEAF))
            if isinstance(acl, tuple):
                return self._send(acl[0], acl[1].encode(), "text/plain")
            self.scope = server._scope(token)
            try:
                if url.path.startswith(("/v1/agent/connect/", "/v1/connect/")):
                    return self._connect(method, url.path, params, body)
                self._route(method, url.path, params, acl, body)
            except ConnectError as e:
                self._send(400, str(e).encode(), "text/plain")
            except (KeyError, ValueError, TypeError) as e:
                self._send(400, f"Request decode failed: {e}".encode(), "text/plain")

        def _connect(self, method: str, path: str, params: dict[str, list[str]],
                     body: bytes) -> None:
            connect = server.connect
            if path == ROOTS and method == "GET":
                index = server._blocking(params, lambda: connect.roots_index, self.connection)
                if isinstance(index, tuple):
                    return self._send(index[0], index[1].encode(), "text/plain")
                with server._cond:
                    roots = connect.roots_json()
                return self._json(roots, index, True)
            if path.startswith(LEAF) and method == "GET":
                service = urllib.parse.unquote(path.removeprefix(LEAF))
                if not service or "/" in service:
                    return self._send(404, b"404 page not found", "text/plain")
                index = server._blocking(params, lambda: connect.leaf_index(service),
                                         self.connection)
                if isinstance(index, tuple):
                    return self._send(index[0], index[1].encode(), "text/plain")
                with server._cond:
                    leaf = connect.leaf(service).json()
                return self._json(leaf, leaf["ModifyIndex"], True)
            if path == "/v1/agent/connect/authorize":
                if method != "POST":
                    return self._send(405, f"method {method} not allowed".encode(), "text/plain")
                request = json.loads(body or b"{}")
                if not isinstance(request, dict):
                    raise ConnectError("Request decode failed: expected a JSON object")
                # No intention matches: the ACL default policy decides (allow with ACLs
                # off; the anonymous "deny" of this server's ACL model otherwise).
                policy = server.default_policy or ("allow" if server.acl is None else "deny")
                with server._cond:
                    answer = connect.authorize(request, policy == "allow")
                return self._send(200, json.dumps(answer).encode(), "application/json")
            if path == "/v1/connect/intentions/exact":
                source = params.get("source", [""])[-1]
                destination = params.get("destination", [""])[-1]
                if not source or not destination:
                    raise ConnectError("required query parameters: source, destination")
                if method == "PUT":
                    request = json.loads(body or b"{}")
                    server.set_intention(source, destination, str(request.get("Action", "")))
                    return self._send(200, b"true", "application/json")
                if method == "DELETE":
                    server.delete_intention(source, destination)
                    return self._send(200, b"true", "application/json")
                with server._cond:
                    found = connect.intentions.get((source, destination))
                    data = found.json() if found else None
                if data is None:
                    return self._send(404, b"Intention not found", "text/plain")
                return self._send(200, json.dumps(data).encode(), "application/json")
            self._send(404, b"404 page not found", "text/plain")

        def _route(self, method: str, path: str, params: dict[str, list[str]], allowed: bool,
                   body: bytes) -> None:
            dc = params.get("dc", [server.datacenter])[-1] or server.datacenter
            if method == "GET" and path.startswith("/v1/health/service/"):
                name = urllib.parse.unquote(path.removeprefix("/v1/health/service/"))
                if self.scope is not None and not name.startswith(self.scope):
                    return self._send(403, b"Permission denied", "text/plain")
                if dc not in server.datacenters:
                    return self._send(500, b"No path to datacenter", "text/plain")
                index = server._blocking(
                    params, lambda: server._service_index.get(name, server._index),
                    self.connection)
                if isinstance(index, tuple):
                    return self._send(index[0], index[1].encode(), "text/plain")
                return self._json(server._health(name, params, allowed), index, allowed)
            if method == "GET" and path == "/v1/catalog/services":
                if dc not in server.datacenters:
                    return self._send(500, b"No path to datacenter", "text/plain")
                index = server._blocking(params, lambda: server._index, self.connection)
                if isinstance(index, tuple):
                    return self._send(index[0], index[1].encode(), "text/plain")
                names = server._catalog(dc, allowed)
                if self.scope is not None:
                    scoped = {k: v for k, v in names.items() if k.startswith(self.scope)}
                    allowed, names = allowed and len(scoped) == len(names), scoped
                return self._json(names, index, allowed)
            if path == "/v1/config" or path.startswith("/v1/config/"):
                return self._config(method, path, params, body)
            if method == "PUT" and path == "/v1/agent/service/register":
                server._register_body(json.loads(body or b"{}"))
                return self._send(200, b"", "text/plain")
            if method == "PUT" and path.startswith("/v1/agent/service/deregister/"):
                iid = urllib.parse.unquote(path.removeprefix("/v1/agent/service/deregister/"))
                if iid not in {i.id for i in server.instances()}:
                    return self._send(404, f'Unknown service ID "{iid}"'.encode(), "text/plain")
                server.deregister(iid)
                return self._send(200, b"", "text/plain")
            self._send(404, b"404 page not found", "text/plain")

        def _config(self, method: str, path: str, params: dict[str, list[str]],
                    body: bytes) -> None:
            raw_cas = params.get("cas", [""])[-1]
            cas = int(raw_cas) if raw_cas else None
            if method == "PUT" and path == "/v1/config":
                try:
                    ok = server.write_config(json.loads(body or b"null"), cas)
                except ConfigEntryError as e:
                    return self._send(400, str(e).encode(), "text/plain")
                return self._send(200, b"true" if ok else b"false", "application/json")
            parts = [urllib.parse.unquote(p) for p in path.removeprefix("/v1/config/").split("/")]
            if method == "DELETE" and len(parts) == 2 and all(parts):
                ok = server.delete_config(parts[0], parts[1], cas)
                return self._send(200, b"true" if ok else b"false", "application/json")
            if method != "GET" or not 1 <= len(parts) <= 2 or not all(parts):
                return self._send(405 if method not in ("GET", "DELETE") else 404,
                                  b"method not allowed" if method not in ("GET", "DELETE")
                                  else b"404 page not found", "text/plain")
            index = server._blocking(params, lambda: server.config.index, self.connection)
            if isinstance(index, tuple):
                return self._send(index[0], index[1].encode(), "text/plain")
            if len(parts) == 1:
                with server._cond:   # serialized under the lock, sent outside it
                    text = json.dumps(server.config.list(parts[0], copy=False))
                return self._json(text, index, True)
            with server._cond:
                entry = server.config.get(parts[0], parts[1])
            if entry is None:
                return self._send(404, f'Config entry not found for "{parts[0]}" / '
                                       f'"{parts[1]}"'.encode(), "text/plain",
                                  {"X-Consul-Index": str(index), "X-Consul-KnownLeader": "true",
                                   "X-Consul-LastContact": "0"})
            return self._json(entry, index, True)

        def _json(self, data: Any, index: int, allowed: bool) -> None:
            if not server._running:
                self.close_connection = True   # stopped while blocked: the agent is gone
                return
            headers = {"X-Consul-Index": str(index), "X-Consul-KnownLeader": "true",
                       "X-Consul-LastContact": "0"}
            if not allowed:
                headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
            body = data if isinstance(data, str) else json.dumps(data)   # str: JSON already
            self._send(200, body.encode(), "application/json", headers)

        def _send(self, status: int, body: bytes, ctype: str,
                  headers: Mapping[str, str] | None = None) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
            except OSError:
                self.close_connection = True

    return Handler


def _hung_up(conn: socket.socket) -> bool:
    """The client closed its end (a request's body was read, so readable means EOF)."""
    try:
        poller = select.poll()   # not select(): descriptors may pass FD_SETSIZE
        poller.register(conn, select.POLLIN)
        return bool(poller.poll(0)) and conn.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def _bearer(value: str | None) -> str | None:
    if value and value.lower().startswith("bearer "):
        return value[7:].strip() or None
    return None


def _flag(params: Mapping[str, list[str]], name: str) -> bool:
    """Consul's query flags: present with no value, or a true boolean."""
    if name not in params:
        return False
    return params[name][-1].lower() in ("", "1", "t", "true")


def _parse_go_duration(text: str) -> float | None:
    parts = _GO_DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _check_status(status: str) -> None:
    if status not in ("passing", "warning", "critical"):
        raise ValueError(f"health status must be passing, warning or critical, got {status!r}")
