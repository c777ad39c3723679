"""A Kubernetes API test server, faithful to the protocol a discovery plugin speaks.

    api = K8sApiServer().start()            # TLS with a throwaway CA: api.url, api.ca_file
    api.create_service("web")
    api.apply_slice("web-1", "web", [endpoint("10.0.0.1"), endpoint("10.0.0.2", ready=False)],
                    ports={"http": 8080})
    ...
    api.stop()

What it serves (``discovery.k8s.io/v1`` and ``v1`` as the real API server does):

- ``GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices?labelSelector=k=v,...``:
  an ``EndpointSliceList`` whose ``metadata.resourceVersion`` is the store's current one.
- The same with ``watch=1``: a chunked stream of newline-delimited JSON events
  (``ADDED``/``MODIFIED``/``DELETED``, ``BOOKMARK`` when ``allowWatchBookmarks`` is set),
  replaying the retained history after ``resourceVersion`` first (without one: synthetic
  ADDED events for the current objects), and ending after ``timeoutSeconds``. A
  ``resourceVersion`` older than the history window gets an ``ERROR`` event carrying a
  ``Status`` with code 410 (the watch cache's way), or an HTTP 410 with
  ``gone_as_http = True``.
- ``GET /api/v1/namespaces/{ns}/services/{name}``: the Service, or a 404 Status.
- The Gateway API (``gateway.networking.k8s.io/v1``) ``httproutes`` and ``grpcroutes``,
  namespaced: list and watch as above (same resourceVersion, bookmarks, 410), ``GET`` of
  one object, and ``POST`` (create: 409 AlreadyExists), ``PUT`` (replace: 404 when absent,
  409 Conflict when the body's ``metadata.resourceVersion`` is not the current one),
  ``PATCH`` (``application/merge-patch+json`` only, as for custom resources; 415
  otherwise) and ``DELETE`` (answers the deleted object), as ``kubectl apply``/``patch``/
  ``delete`` use them. Istio's ``security.istio.io/v1`` ``authorizationpolicies`` the same
  way (``authorization_policy()`` builds one). The
  server sets ``uid``, ``creationTimestamp`` (kept on replace), ``resourceVersion`` and
  ``generation`` (bumped when ``spec`` changes). Only the envelope is checked (kind,
  apiVersion, name, namespace), not the CRD's OpenAPI schema: tests may store what a real
  server would refuse, to see that meshd refuses it too. ``apply(obj)`` and
  ``delete(resource, name)`` do the same from Python; ``http_route()``/``grpc_route()``
  build objects. Routes have the ``status`` subresource: ``PATCH .../NAME/status``
  (merge patch; ``metadata.resourceVersion`` a precondition) changes ``status`` alone,
  writes to the object itself keep it (``status_writes`` counts the patches).

Every request needs ``Authorization: Bearer T`` with T in ``tokens`` (None: no auth);
otherwise 401 with a Status body. Errors are ``Status`` objects like the real ones.

One global resourceVersion counter orders every change; each mutator bumps it, records
the event in the history (``history_window`` events are kept) and pushes it to the open
watches it matches. Fault knobs: ``expire_history()``, ``send_bookmark()``,
``drop_watches(abrupt=...)``, ``fail_next(n, status)``, ``stop()``/``restart()`` (same
port). ``requests`` records what was asked, for assertions.
"""

from __future__ import annotations

import copy
import datetime
import ipaddress
import json
import queue
import select
import socket
import ssl
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

SLICES = "/apis/discovery.k8s.io/v1/namespaces/"
SERVICES = "/api/v1/namespaces/"
GATEWAY = "gateway.networking.k8s.io/v1"
# resource (the URL's plural) -> (group/version, kind) of what the store serves
RESOURCES = {"endpointslices": ("discovery.k8s.io/v1", "EndpointSlice"),
             "httproutes": (GATEWAY, "HTTPRoute"),
             "grpcroutes": (GATEWAY, "GRPCRoute")}
WRITABLE: tuple[str, ...] = ("httproutes", "grpcroutes")   # POST/PUT/DELETE over HTTP
STATUS_SUBRESOURCE = ("httproutes", "grpcroutes")   # PATCH .../NAME/status (merge patch)
# Istio's security API: AuthorizationPolicy (the kubernetes config source's authorization)
SECURITY = "security.istio.io/v1"
RESOURCES["authorizationpolicies"] = (SECURITY, "AuthorizationPolicy")
WRITABLE += ("authorizationpolicies",)
MAX_BODY = 1 << 20
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
            405: "MethodNotAllowed", 409: "Conflict", 410: "Expired", 413: "RequestEntityTooLarge",
            415: "UnsupportedMediaType", 429: "TooManyRequests", 500: "InternalError",
            503: "ServiceUnavailable"}
GONE_CHECK = 0.1       # how often an idle watch stream checks that its client is still there
_CLOSE = object()      # a watch queue item: end the stream gracefully
_ABORT = object()      # a watch queue item: cut the connection


def endpoint(address: str, *, ready: bool | None = True, serving: bool | None = None,
             terminating: bool | None = None, zone: str | None = None,
             node: str | None = None, pod: str | None = None) -> dict[str, Any]:
    """One ``endpoints[]`` entry; ``None`` leaves a condition unset (ready unset = ready)."""
    conditions: dict[str, bool] = {}
    if ready is not None:
        conditions["ready"] = ready
    if serving is not None or ready is not None:
        conditions["serving"] = serving if serving is not None else bool(ready)
    if terminating is not None:
        conditions["terminating"] = terminating
    ep: dict[str, Any] = {"addresses": [address], "conditions": conditions}
    if zone:
        ep["zone"] = zone
    if node:
        ep["nodeName"] = node
    if pod:
        ep["targetRef"] = {"kind": "Pod", "name": pod, "uid": str(uuid.uuid4())}
    return ep


def status(code: int, message: str, reason: str = "") -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason or _REASONS.get(code, "Unknown"), "code": code}


def http_route(name: str, service: str, rules: Sequence[Mapping[str, Any]],
               namespace: str = "default", *, port: int | None = None,
               service_namespace: str | None = None) -> dict[str, Any]:
    """An HTTPRoute attached to Service ``service`` (the GAMMA mesh pattern)."""
    return _route("HTTPRoute", name, service, rules, namespace, port, service_namespace)


def grpc_route(name: str, service: str, rules: Sequence[Mapping[str, Any]],
               namespace: str = "default", *, port: int | None = None,
               service_namespace: str | None = None) -> dict[str, Any]:
    return _route("GRPCRoute", name, service, rules, namespace, port, service_namespace)


def backend(name: str, weight: int | None = None, port: int = 80) -> dict[str, Any]:
    """One ``backendRefs[]`` entry naming a Service."""
    ref: dict[str, Any] = {"name": name, "port": port}
    if weight is not None:
        ref["weight"] = weight
    return ref


def _route(kind: str, name: str, service: str, rules: Sequence[Mapping[str, Any]],
           namespace: str, port: int | None, service_namespace: str | None) -> dict[str, Any]:
    parent: dict[str, Any] = {"group": "", "kind": "Service", "name": service}
    if port is not None:
        parent["port"] = port
    if service_namespace is not None:
        parent["namespace"] = service_namespace
    return {"apiVersion": GATEWAY, "kind": kind,
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"parentRefs": [parent], "rules": copy.deepcopy(list(rules))}}


class ApiError(Exception):
    """A request the store refuses: ``code`` and the Status to answer."""

    def __init__(self, code: int, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.body = status(code, message, reason)


@dataclass
class Request:
    path: str
    query: dict[str, str]
    token: str | None
    status: int = 0
    method: str = "GET"

    @property
    def watch(self) -> bool:
        return self.query.get("watch") in ("1", "true")


@dataclass(eq=False)  # kept in a set: identity is the key
class _Watch:
    resource: str
    namespace: str
    selector: dict[str, str]
    bookmarks: bool
    events: queue.Queue[object] = field(default_factory=queue.Queue)
    sock: socket.socket | None = None


class K8sApiServer:
    def __init__(self, *, tls: bool = True, tokens: Sequence[str] | None = ("test-token",),
                 history_window: int = 1000, host: str = "127.0.0.1") -> None:
        self.tls = tls
        self.host = host
        self.port = 0
        self.tokens: set[str] | None = set(tokens) if tokens is not None else None
        self.history_window = history_window
        self.gone_as_http = False
        self.requests: list[Request] = []
        self.rv = 1
        self.floor = 0   # a watch from a resourceVersion below this gets 410
        self.services: dict[tuple[str, str], dict[str, Any]] = {}
        # resource -> (namespace, name) -> object; ``slices`` is the EndpointSlice store
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {
            r: {} for r in RESOURCES}
        self.slices = self.objects["endpointslices"]
        # (resourceVersion, resource, namespace, event type, object)
        self._history: deque[tuple[int, str, str, str, dict[str, Any]]] = deque()
        self._watches: set[_Watch] = set()
        self.max_open_watches = 0   # the most watch streams open at once
        self.status_writes = 0      # route status subresource patches that succeeded
        self._conns: set[socket.socket] = set()
        self._failures: list[tuple[int, str]] = []
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="k8s-api-")
        self.ca_file = ""
        self._ctx: ssl.SSLContext | None = None
        if tls:
            self.ca_file, cert, key = _make_certs(Path(self._dir.name), host)
            self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._ctx.load_cert_chain(cert, key)

    # -- lifecycle --

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def start(self) -> K8sApiServer:
        httpd = _Server((self.host, self.port), _Handler, self)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, args=(0.05,),
                                        name="k8s-api", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection (watches included)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            for w in self._watches:
                w.events.put(_ABORT)
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)

    def restart(self) -> K8sApiServer:
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> K8sApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- auth and faults --

    def set_tokens(self, *tokens: str) -> None:
        with self._lock:
            self.tokens = set(tokens)

    def fail_next(self, n: int, code: int = 500, path_contains: str = "") -> None:
        """The next ``n`` requests (whose path contains ``path_contains``) get ``code``."""
        with self._lock:
            self._failures += [(code, path_contains)] * n

    def expire_history(self) -> int:
        """Compact: every resourceVersion handed out so far is too old to watch from."""
        with self._lock:
            self.rv += 1
            self.floor = self.rv
            self._history.clear()
            return self.rv

    def send_bookmark(self) -> int:
        """A BOOKMARK at the current resourceVersion to every watch that allows them."""
        with self._lock:
            for w in self._watches:
                if w.bookmarks:
                    w.events.put(_bookmark(w.resource, self.rv))
            return self.rv

    def drop_watches(self, abrupt: bool = False) -> int:
        """End the open watch streams: normally (final chunk) or by cutting the connection."""
        with self._lock:
            for w in self._watches:
                w.events.put(_ABORT if abrupt else _CLOSE)
            return len(self._watches)

    def open_watches(self) -> int:
        with self._lock:
            return len(self._watches)

    def wait_watches(self, n: int = 1, timeout: float = 5.0) -> None:
        """Wait until at least ``n`` watch streams are open."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._watches) >= n, timeout):
                raise TimeoutError(f"{len(self._watches)} watches open, not {n}, "
                                   f"after {timeout}s")

    def slice_requests(self, watch: bool | None = None,
                       resource: str = "endpointslices") -> list[Request]:
        with self._lock:
            return [r for r in self.requests if f"/{resource}" in r.path
                    and (watch is None or r.watch == watch)]

    def wait_requests(self, n: int, watch: bool | None = None, status: int | None = 200,
                      timeout: float = 5.0, resource: str = "endpointslices") -> list[Request]:
        """Wait until at least ``n`` requests for ``resource`` were answered (with ``status``)."""
        def done() -> list[Request]:
            return [r for r in self.slice_requests(watch, resource)
                    if status is None or r.status == status]
        with self._changed:
            if not self._changed.wait_for(lambda: len(done()) >= n, timeout):
                raise TimeoutError(f"{len(done())} {resource} requests (watch={watch}, "
                                   f"status={status}), not {n}, after {timeout}s")
            return done()

    # -- the store --

    def create_service(self, name: str, namespace: str = "default",
                       labels: Mapping[str, str] | None = None) -> int:
        with self._lock:
            rv = self._bump()
            self.services[(namespace, name)] = {
                "kind": "Service", "apiVersion": "v1",
                "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()),
                             "resourceVersion": str(rv), "labels": dict(labels or {})},
                "spec": {"type": "ClusterIP"},
            }
            return rv

    def delete_service(self, name: str, namespace: str = "default") -> int:
        with self._lock:
            del self.services[(namespace, name)]
            return self._bump()

    def apply_slice(self, name: str, service: str, endpoints: Sequence[Mapping[str, Any] | str],
                    ports: Mapping[str, int] | int = 80, namespace: str = "default",
                    labels: Mapping[str, str] | None = None,
                    address_type: str = "IPv4") -> int:
        """Create or replace an EndpointSlice; ``ports`` is {name: port} or one unnamed port."""
        port_list = ([{"name": "", "port": ports, "protocol": "TCP"}] if isinstance(ports, int)
                     else [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports.items()])
        obj: dict[str, Any] = {
            "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {**(labels or {}), SERVICE_NAME_LABEL: service,
                                    "endpointslice.kubernetes.io/managed-by":
                                        "endpointslice-controller.k8s.io"}},
            "addressType": address_type,
            "endpoints": [endpoint(e) if isinstance(e, str) else copy.deepcopy(dict(e))
                          for e in endpoints],
            "ports": port_list,
        }
        with self._lock:
            old = self.slices.get((namespace, name))
            if old is not None:
                obj["metadata"]["uid"] = old["metadata"]["uid"]
            return self._store("endpointslices", namespace, name, obj,
                               "MODIFIED" if old else "ADDED")

    def set_condition(self, slice_name: str, address: str, namespace: str = "default",
                      **conditions: bool) -> int:
        """Change conditions (ready, serving, terminating) of one endpoint of a slice."""
        with self._lock:
            obj = copy.deepcopy(self.slices[(namespace, slice_name)])
            for ep in obj["endpoints"]:
                if address in ep["addresses"]:
                    ep.setdefault("conditions", {}).update(conditions)
                    break
            else:
                raise KeyError(f"no endpoint {address} in slice {slice_name}")
            return self._store("endpointslices", namespace, slice_name, obj, "MODIFIED")

    def delete_slice(self, name: str, namespace: str = "default") -> int:
        with self._lock:
            return self._delete("endpointslices", namespace, name)[0]

    # -- Gateway API objects (and any writable resource) --

    def apply(self, obj: Mapping[str, Any]) -> int:
        """Create or replace (as ``kubectl apply``); the new resourceVersion."""
        body: dict[str, Any] = copy.deepcopy(dict(obj))
        resource = _resource_of(body)
        md = body.setdefault("metadata", {})
        namespace = md.setdefault("namespace", "default")
        with self._lock:
            md.pop("resourceVersion", None)
            if (namespace, md.get("name")) in self.objects[resource]:
                return self._replace(resource, namespace, str(md.get("name")), body)
            return self._create(resource, namespace, body)

    def delete(self, resource: str, name: str, namespace: str = "default") -> int:
        with self._lock:
            return self._delete(resource, namespace, name)[0]

    def get(self, resource: str, name: str, namespace: str = "default") -> dict[str, Any] | None:
        """A copy of a stored object (its status too), or None."""
        with self._lock:
            obj = self.objects[resource].get((namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def _create(self, resource: str, namespace: str, obj: dict[str, Any]) -> int:
        name = _check(resource, namespace, obj)
        if (namespace, name) in self.objects[resource]:
            raise ApiError(409, f'{resource}.{_group(resource)} "{name}" already exists',
                           "AlreadyExists")
        md = obj["metadata"]
        md["uid"] = str(uuid.uuid4())
        md["creationTimestamp"] = datetime.datetime.now(datetime.UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
        md["generation"] = 0
        return self._store(resource, namespace, name, obj, "ADDED")

    def _replace(self, resource: str, namespace: str, name: str, obj: dict[str, Any]) -> int:
        if _check(resource, namespace, obj) != name:
            raise ApiError(400, f"the name of the object ({obj['metadata'].get('name')}) does "
                                f"not match the name on the URL ({name})")
        old = self.objects[resource].get((namespace, name))
        if old is None:
            raise ApiError(404, f'{resource}.{_group(resource)} "{name}" not found')
        md, omd = obj["metadata"], old["metadata"]
        if md.get("resourceVersion") not in (None, "", omd["resourceVersion"]):
            raise ApiError(409, f'Operation cannot be fulfilled on {resource} "{name}": the '
                                f"object has been modified; please apply your changes to the "
                                f"latest version and try again", "Conflict")
        for key in ("uid", "creationTimestamp"):
            md[key] = omd[key]
        if resource in STATUS_SUBRESOURCE:   # status is written through its subresource only
            obj.pop("status", None)
            if "status" in old:
                obj["status"] = copy.deepcopy(old["status"])
        md["generation"] = omd["generation"] - (obj.get("spec") == old.get("spec"))
        return self._store(resource, namespace, name, obj, "MODIFIED")

    def _patch_status(self, resource: str, namespace: str, name: str, patch: Any) -> int:
        """A merge patch of the ``status`` subresource: only ``status`` changes (not
        ``generation``); ``metadata.resourceVersion`` in the patch is a precondition."""
        old = self.objects[resource].get((namespace, name))
        if old is None:
            raise ApiError(404, f'{resource}.{GATEWAY.split("/")[0]} "{name}" not found')
        if not isinstance(patch, dict):
            raise ApiError(400, "the patch is not a JSON object")
        want = (patch.get("metadata") or {}).get("resourceVersion")
        if want not in (None, "", old["metadata"]["resourceVersion"]):
            raise ApiError(409, f'Operation cannot be fulfilled on {resource} "{name}": the '
                                f"object has been modified; please apply your changes to the "
                                f"latest version and try again", "Conflict")
        obj = copy.deepcopy(old)
        status_patch = patch.get("status")
        if status_patch is not None:
            obj["status"] = merge_patch(old.get("status") or {}, status_patch)
        obj["metadata"]["generation"] -= 1   # _store adds it back: the spec did not change
        self.status_writes += 1
        return self._store(resource, namespace, name, obj, "MODIFIED")

    def _delete(self, resource: str, namespace: str, name: str) -> tuple[int, dict[str, Any]]:
        obj = self.objects[resource].pop((namespace, name), None)
        if obj is None:
            raise ApiError(404, f'{resource} "{name}" not found')
        obj = copy.deepcopy(obj)
        rv = self._bump()
        obj["metadata"]["resourceVersion"] = str(rv)
        self._record(rv, resource, namespace, "DELETED", obj)
        return rv, obj

    def _bump(self) -> int:
        self.rv += 1
        return self.rv

    def _store(self, resource: str, namespace: str, name: str, obj: dict[str, Any],
               kind: str) -> int:
        rv = self._bump()
        md = obj["metadata"]
        md.setdefault("uid", str(uuid.uuid4()))
        md["resourceVersion"] = str(rv)
        md["generation"] = md.get("generation", 0) + 1
        self.objects[resource][(namespace, name)] = obj
        self._record(rv, resource, namespace, kind, obj)
        return rv

    def _record(self, rv: int, resource: str, namespace: str, kind: str,
                obj: dict[str, Any]) -> None:
        self._history.append((rv, resource, namespace, kind, obj))
        while len(self._history) > self.history_window:
            self.floor = self._history.popleft()[0]
        for w in self._watches:
            if w.resource == resource and w.namespace == namespace and _matches(obj, w.selector):
                w.events.put({"type": kind, "object": copy.deepcopy(obj)})

    # -- serving (called from handler threads) --

    def _authorize(self, token: str | None) -> bool:
        with self._lock:
            return self.tokens is None or token in self.tokens

    def _take_failure(self, path: str) -> int:
        with self._lock:
            for i, (code, part) in enumerate(self._failures):
                if part in path:
                    del self._failures[i]
                    return code
            return 0

    def _log(self, req: Request, code: int) -> None:
        with self._changed:
            req.status = code
            self.requests.append(req)
            self._changed.notify_all()

    def _list(self, namespace: str, selector: dict[str, str],
              resource: str = "endpointslices") -> dict[str, Any]:
        group_version, kind = RESOURCES[resource]
        with self._lock:
            items = [copy.deepcopy(o) for (ns, _), o in sorted(self.objects[resource].items())
                     if ns == namespace and _matches(o, selector)]
            if resource == "endpointslices":  # built-in types' list items carry no kind
                for o in items:
                    o.pop("kind", None)
                    o.pop("apiVersion", None)
            return {"kind": f"{kind}List", "apiVersion": group_version,
                    "metadata": {"resourceVersion": str(self.rv)}, "items": items}

    def _subscribe(self, w: _Watch, since: int | None) -> list[object] | int:
        """Register ``w``; the events to replay first, or 410's floor if ``since`` is too old."""
        with self._changed:
            if since is not None and since < self.floor:
                return self.floor
            if since is None:
                backlog: list[object] = [
                    {"type": "ADDED", "object": copy.deepcopy(o)}
                    for (ns, _), o in sorted(self.objects[w.resource].items())
                    if ns == w.namespace and _matches(o, w.selector)]
            else:
                backlog = [{"type": kind, "object": copy.deepcopy(o)}
                           for rv, res, ns, kind, o in self._history
                           if rv > since and res == w.resource and ns == w.namespace
                           and _matches(o, w.selector)]
            self._watches.add(w)
            self.max_open_watches = max(self.max_open_watches, len(self._watches))
            self._changed.notify_all()
            return backlog

    def _unsubscribe(self, w: _Watch) -> None:
        with self._changed:
            self._watches.discard(w)
            self._changed.notify_all()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 api: K8sApiServer) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.api = api
        super().__init__(address, handler)

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = self.socket.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as Go's net/http does
        with self.api._lock:
            self.api._conns.add(sock)
        return sock, addr

    def finish_request(self, request: Any, client_address: Any) -> None:
        conn = request
        try:
            if self.api._ctx is not None:  # the handshake happens here, in the handler thread
                request.settimeout(10)
                conn = self.api._ctx.wrap_socket(request, server_side=True)
                conn.settimeout(None)
                with self.api._lock:  # the plain socket is detached now: track the TLS one
                    self.api._conns.discard(request)
                    self.api._conns.add(conn)
            super().finish_request(conn, client_address)
        finally:
            with self.api._lock:
                self.api._conns.discard(conn)
                self.api._conns.discard(request)
            if conn is not request:
                conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that go away mid-stream are normal here


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        api = self.server.api
        url = urlsplit(self.path)
        query = dict(parse_qsl(url.query))
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        req = Request(url.path, query, token)
        if not api._authorize(token):
            return self._status(req, 401, "Unauthorized")
        code = api._take_failure(url.path)
        if code:
            return self._status(req, code, f"injected failure {code}")
        parts = url.path.strip("/").split("/")
        found = _collection(parts)
        if found is not None and len(parts) == 6:
            resource, namespace = found
            selector, bad = _selector(query.get("labelSelector", ""))
            if bad:
                return self._status(req, 400, f"unable to parse requirement: {bad!r}")
            if req.watch:
                return self._watch(req, resource, namespace, selector, query)
            return self._json(req, 200, api._list(namespace, selector, resource))
        if found is not None and len(parts) == 7:
            with api._lock:
                obj = copy.deepcopy(api.objects[found[0]].get((found[1], parts[6])))
            if obj is None:
                return self._status(req, 404, f'{found[0]} "{parts[6]}" not found')
            return self._json(req, 200, obj)
        if url.path.startswith(SERVICES) and len(parts) == 6 and parts[4] == "services":
            with api._lock:
                svc = copy.deepcopy(api.services.get((parts[3], parts[5])))
            if svc is None:
                return self._status(req, 404, f'services "{parts[5]}" not found')
            return self._json(req, 200, svc)
        return self._status(req, 404, "the server could not find the requested resource")

    def do_POST(self) -> None:
        self._write("POST")

    def do_PUT(self) -> None:
        self._write("PUT")

    def do_DELETE(self) -> None:
        self._write("DELETE")

    def do_PATCH(self) -> None:
        self._write("PATCH")

    def _write(self, method: str) -> None:
        """Create (POST to the collection), replace (PUT), merge-patch (PATCH, RFC 7386, as
        ``kubectl apply``/``patch --type merge`` send to custom resources) or delete
        (DELETE) one object."""
        api = self.server.api
        url = urlsplit(self.path)
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        req = Request(url.path, dict(parse_qsl(url.query)), token, method=method)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True
            return self._status(req, 413, "request body too large or without a length")
        raw = self.rfile.read(length) if length else b""
        if not api._authorize(token):
            return self._status(req, 401, "Unauthorized")
        code = api._take_failure(url.path)
        if code:
            return self._status(req, code, f"injected failure {code}")
        parts = url.path.strip("/").split("/")
        subresource = ""
        if method == "PATCH" and len(parts) == 8 and parts[7] == "status":
            parts, subresource = parts[:7], "status"   # route status (GAMMA)
        found = _collection(parts)
        want = 6 if method == "POST" else 7
        if found is None or len(parts) != want or found[0] not in WRITABLE:
            return self._status(req, 405 if found else 404,
                                f"the server does not allow this method on {url.path}")
        resource, namespace = found
        try:
            if method == "DELETE":
                with api._lock:
                    _, obj = api._delete(resource, namespace, parts[6])
                return self._json(req, 200, obj)
            content_type = self.headers.get("Content-Type", "").split(";")[0].strip()
            if method == "PATCH" and content_type != "application/merge-patch+json":
                # what the real server says for custom resources (no strategic merge)
                return self._status(req, 415, f"the body of the request was in an unknown "
                                              f"format - accepted media types include: "
                                              f"application/merge-patch+json "
                                              f"(not {content_type or 'none'})")
            try:
                body = json.loads(raw)
            except ValueError:
                return self._status(req, 400, "the body is not JSON")
            with api._lock:
                if subresource and resource in STATUS_SUBRESOURCE:
                    api._patch_status(resource, namespace, parts[6], body)
                    body = {"metadata": {"name": parts[6]}}
                elif method == "PATCH":
                    old = api.objects[resource].get((namespace, parts[6]))
                    if old is None:
                        raise ApiError(404, f'{resource} "{parts[6]}" not found')
                    body = merge_patch(old, body)
                    api._replace(resource, namespace, parts[6], body)
                elif method == "POST":
                    api._create(resource, namespace, body)
                else:
                    api._replace(resource, namespace, parts[6], body)
                obj = copy.deepcopy(api.objects[resource][(namespace, body["metadata"]["name"])])
            return self._json(req, 201 if method == "POST" else 200, obj)
        except ApiError as e:
            return self._json(req, e.code, e.body)

    def _json(self, req: Request, code: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.server.api._log(req, code)

    def _status(self, req: Request, code: int, message: str) -> None:
        self._json(req, code, status(code, message))

    def _watch(self, req: Request, resource: str, namespace: str, selector: dict[str, str],
               query: dict[str, str]) -> None:
        api = self.server.api
        try:
            since = int(query["resourceVersion"]) if query.get("resourceVersion") else None
            timeout = float(query.get("timeoutSeconds") or 1800)
        except ValueError:
            return self._status(req, 400, "resourceVersion and timeoutSeconds must be numbers")
        if since == 0:
            since = None  # "0": any version; served like "start from the current state"
        w = _Watch(resource, namespace, selector, query.get("allowWatchBookmarks") == "true",
                   sock=self.connection)
        backlog = api._subscribe(w, since)
        if isinstance(backlog, int) and api.gone_as_http:
            return self._status(req, 410, f"too old resource version: {since} ({backlog})")
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            api._log(req, 200)
            if isinstance(backlog, int):
                self._chunk({"type": "ERROR",
                             "object": status(410, f"too old resource version: {since} "
                                                   f"({backlog})")})
                return self._end()
            for event in backlog:
                self._chunk(event)
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return self._end()
                try:
                    item = w.events.get(timeout=min(left, GONE_CHECK))
                except queue.Empty:
                    # A streaming client sends nothing more: readable means it went away
                    # (the real server notices the same way and ends the watch).
                    if select.select([self.connection], [], [], 0)[0]:
                        self.close_connection = True
                        return
                    continue
                if item is _CLOSE:
                    return self._end()
                if item is _ABORT:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self._chunk(item)
        except OSError:
            self.close_connection = True
        finally:
            api._unsubscribe(w)

    def _chunk(self, event: object) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _end(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge key by key, ``null`` deletes, anything
    else (lists included) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _group(resource: str) -> str:
    return RESOURCES[resource][0].split("/")[0]


def authorization_policy(name: str, service: str | None,
                         rules: Sequence[Mapping[str, Any]] | None,
                         namespace: str = "default", *, action: str | None = None,
                         dry_run: bool = False) -> dict[str, Any]:
    """An Istio AuthorizationPolicy whose targetRefs name Service ``service`` (None: none,
    a namespace-wide policy); ``rules`` None leaves ``spec.rules`` out (allow nothing)."""
    spec: dict[str, Any] = {}
    if service is not None:
        spec["targetRefs"] = [{"group": "", "kind": "Service", "name": service}]
    if action is not None:
        spec["action"] = action
    if rules is not None:
        spec["rules"] = copy.deepcopy(list(rules))
    md: dict[str, Any] = {"name": name, "namespace": namespace}
    if dry_run:
        md["annotations"] = {"istio.io/dry-run": "true"}
    return {"apiVersion": SECURITY, "kind": "AuthorizationPolicy", "metadata": md, "spec": spec}


def _bookmark(resource: str, rv: int) -> dict[str, Any]:
    group_version, kind = RESOURCES[resource]
    return {"type": "BOOKMARK",
            "object": {"kind": kind, "apiVersion": group_version,
                       "metadata": {"resourceVersion": str(rv)}}}


def _resource_of(obj: Mapping[str, Any]) -> str:
    for resource, (group_version, kind) in RESOURCES.items():
        if obj.get("kind") == kind and obj.get("apiVersion") == group_version:
            return resource
    raise ApiError(400, f"no resource for kind {obj.get('kind')!r} "
                        f"apiVersion {obj.get('apiVersion')!r}")


def _check(resource: str, namespace: str, obj: Any) -> str:
    """The envelope of an object written to ``resource`` in ``namespace``; its name."""
    group_version, kind = RESOURCES[resource]
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        raise ApiError(400, "Object 'metadata' is missing or not an object")
    if obj.get("kind") != kind or obj.get("apiVersion") != group_version:
        raise ApiError(400, f"the API version in the data ({obj.get('apiVersion')}) and kind "
                            f"({obj.get('kind')}) do not match {group_version} {kind}")
    md = obj["metadata"]
    name = md.get("name")
    if not isinstance(name, str) or not name:
        raise ApiError(422, f"{kind}.{group_version} is invalid: metadata.name: Required value",
                       "Invalid")
    if md.setdefault("namespace", namespace) != namespace:
        raise ApiError(400, "the namespace of the provided object does not match the "
                            "namespace sent on the request")
    return name


def _collection(parts: Sequence[str]) -> tuple[str, str] | None:
    """(resource, namespace) of ``/apis/GROUP/VERSION/namespaces/NS/RESOURCE[/NAME]``."""
    if len(parts) not in (6, 7) or parts[0] != "apis" or parts[3] != "namespaces":
        return None
    resource = parts[5]
    if RESOURCES.get(resource, ("", ""))[0] != f"{parts[1]}/{parts[2]}":
        return None
    return resource, parts[4]


def _selector(text: str) -> tuple[dict[str, str], str]:
    """Equality-based label selectors (``a=b,c==d``); the bad term if there is one."""
    out: dict[str, str] = {}
    for term in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = term.replace("==", "=").partition("=")
        if not sep or not key or "!" in key:
            return {}, term
        out[key] = value
    return out, ""


def _matches(obj: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _make_certs(folder: Path, host: str) -> tuple[str, str, str]:
    """A throwaway CA and a server certificate for ``host`` (and localhost) signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "k8s-test-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.DNSName("kubernetes")]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (folder / "ca.crt").write_bytes(ca.public_bytes(pem))
    (folder / "server.crt").write_bytes(cert.public_bytes(pem))
    (folder / "server.key").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(folder / "ca.crt"), str(folder / "server.crt"), str(folder / "server.key")
