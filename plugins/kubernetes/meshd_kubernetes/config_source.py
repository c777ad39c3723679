"""The ``kubernetes`` config source: routes of Services from Gateway API HTTPRoutes and
GRPCRoutes attached to them (the GAMMA mesh pattern), and who may call the Services this
meshd serves from Istio AuthorizationPolicies targeting them, listed then watched.

```toml
[[config_source]]
name = "k8s"
plugin = "kubernetes"
# api_server, token_file, ca_file, kubeconfig, namespace, cluster_domain, timeout,
# watch_timeout: as for the kubernetes discovery plugin (in a pod nothing is needed)
# kinds = ["HTTPRoute", "GRPCRoute", "AuthorizationPolicy"]    # which kinds to read
```

RBAC: ``get``, ``list`` and ``watch`` on ``httproutes`` and ``grpcroutes`` of the group
``gateway.networking.k8s.io`` in the namespaces of the Services meshd routes to; and on
``authorizationpolicies`` of ``security.istio.io`` in the namespaces of the Services its
inbound listeners serve (``watch_authorization``: only those, one list+watch per
namespace, the same machinery; ``meshd_kubernetes.authz`` translates them).

How it reads (one list+watch per namespace and kind, shared by the watches of every
Service in that namespace, started with the first and stopped with the last; for a
Service in another namespace than meshd's own, that one's too, for consumer routes): list
``/apis/gateway.networking.k8s.io/v1/namespaces/NS/httproutes``, then watch from the
list's ``resourceVersion`` with bookmarks, exactly as the EndpointSlice watch does (same
``Client``: token re-read every minute and after a 401; a stream the server ends is
re-watched from the last resourceVersion; 410 Gone re-lists, and what the new list lacks
is deleted). A route kind whose CRD is not installed (404 on the list) counts as empty
and is listed again every ``watch_timeout``. An error ends the shared watch: every
Service's watch raises and meshd restarts it with backoff, keeping the last good routes.

Per Service, ``routes.ServiceRoutes`` picks the routes attached to it, translates and
merges them (``routes.py`` says how), and yields ``Set(Routes)``/``Clear("routes")``,
and ``Refused`` naming an invalid route while its last good version keeps serving.

``write_status = true`` (default false) writes each route's ``status.parents`` back
(``status.py``: Accepted, ResolvedRefs, observedGeneration, per Service parentRef, as
controller ``meshd.dev/fleet``) through the ``status`` subresource, for the routes in the
namespaces this meshd reads; RBAC: ``patch`` on ``httproutes/status`` and
``grpcroutes/status`` (deploy/kubernetes/rbac-gateway-api-status.yaml). meshd elects no
leader: turn it on for one meshd (or a few; they compute the same status, write only
when the object's differs, with its resourceVersion as a precondition, and so converge
on one write per change).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from meshd.errors import ConfigError
from meshd.fleet.api import Clear, Source, Update
from meshd_kubernetes import KubernetesBackend, authz, status
from meshd_kubernetes.client import Client, Gone, KubernetesError, StreamBroken
from meshd_kubernetes.routes import KINDS, ServiceRoutes, parents
from meshd_kubernetes.slices import parse_service

log = logging.getLogger("meshd.config.kubernetes")

GROUP_PATH = "/apis/gateway.networking.k8s.io/v1/namespaces"
RESOURCE = {"HTTPRoute": "httproutes", "GRPCRoute": "grpcroutes"}
_CONNECTION_KEYS = ("api_server", "token_file", "ca_file", "kubeconfig", "namespace",
                    "cluster_domain", "timeout", "watch_timeout")
MAX_QUEUED = 10_000   # events a Service's watch may fall behind before it restarts
STATUS_KEYS = ("write_status",)
MAX_STATUS_PENDING = 10_000   # routes whose status waits to be written (more: dropped)
# Authorization (meshd_kubernetes.authz): Istio's AuthorizationPolicy, a third informer kind
AUTHZ_PATH = f"/apis/{authz.GROUP_VERSION}/namespaces"
_PLURAL = {**RESOURCE, authz.KIND: authz.RESOURCE}
ALL_KINDS = (*KINDS, authz.KIND)


class KubernetesConfigSource(Source):
    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        # Route status written back (status.py, _StatusWriter): its own keys, taken out
        # before the connection keys are checked.
        status_keys = {k: options[k] for k in STATUS_KEYS if k in options}
        options = {k: v for k, v in options.items() if k not in STATUS_KEYS}
        write = status_keys.get("write_status", False)
        if not isinstance(write, bool):
            raise ConfigError([("write_status", f"expected true or false, got {write!r}")])
        self._status: _StatusWriter | None = _StatusWriter(self) if write else None
        super().__init__(name, options)
        problems = [(k, "unknown key") for k in options
                    if k not in (*_CONNECTION_KEYS, "kinds")]
        kinds = options.get("kinds", list(ALL_KINDS))
        if (not isinstance(kinds, list) or not kinds
                or not all(isinstance(k, str) and k in ALL_KINDS for k in kinds)):
            problems.append(("kinds", f"expected a non-empty list of {', '.join(ALL_KINDS)}, "
                                      f"got {kinds!r}"))
            kinds = list(ALL_KINDS)
        try:   # the connection keys mean what they mean for the discovery plugin
            self._conn = KubernetesBackend(name, {k: v for k, v in options.items()
                                                  if k in _CONNECTION_KEYS})
        except ConfigError as e:
            problems += e.problems
        if problems:
            raise ConfigError(problems)
        self.kinds = tuple(dict.fromkeys(kinds))
        self._lock = threading.Lock()
        self._informers: dict[tuple[str, str], _Informer] = {}
        self._closed = threading.Event()

    def watch(self, service: str) -> Iterator[Update]:
        yield from self._watch(service, "routes", [k for k in self.kinds if k in KINDS])

    def watch_authorization(self, service: str) -> Iterator[Update]:
        """The AuthorizationPolicies targeting the Service (``meshd_kubernetes.authz``),
        listed and watched in its namespace; meshd asks only for the services its inbound
        listeners serve."""
        yield from self._watch(service, "authz", [k for k in self.kinds if k == authz.KIND])

    def _watch(self, service: str, part: Any, kinds: list[str]) -> Iterator[Update]:
        settings = self._conn._resolve()
        home = self._conn._namespace
        ref = parse_service(service, home,
                            self._conn._opt.get("cluster_domain", "cluster.local"))
        if ref is None or not kinds:   # not a Kubernetes name: nothing can attach to it
            yield Clear(part)
            self._closed.wait()
            return
        table: Any = (ServiceRoutes(ref.namespace, ref.name,
                                    lambda ns, n: n if ns == home else f"{n}.{ns}")
                      if part == "routes" else authz.ServiceAuthz(ref.namespace, ref.name))
        sub = _Subscriber((ref.namespace, ref.name))
        informers = []
        try:
            with self._lock:
                if self._closed.is_set():
                    return
                # producer routes; and consumer routes, in meshd's own namespace (a
                # policy, in the Service's namespace only)
                for namespace in dict.fromkeys((ref.namespace, home) if part == "routes"
                                               else (ref.namespace,)):
                    for kind in kinds:
                        inf = self._informers.get((namespace, kind))
                        if inf is None or inf.done:
                            inf = _Informer(self, Client(settings, self._conn.timeout),
                                            namespace, kind, self._conn.watch_timeout)
                            self._informers[(namespace, kind)] = inf
                        informers.append(inf)
                        inf.subscribe(sub)
            synced: set[tuple[str, str]] = set()
            while True:
                namespace, kind, op, payload = sub.get()
                if op == "reset":
                    table.reset(kind, namespace, payload)
                    synced.add((namespace, kind))
                elif op == "put":
                    table.put(kind, payload)
                elif op == "delete":
                    table.delete(kind, namespace, payload)
                else:
                    raise payload
                if len(synced) == len(informers):
                    yield from table.updates()
        finally:
            for inf in informers:
                inf.unsubscribe(sub)

    def close(self) -> None:
        if self._status is not None:
            self._status.close()
        with self._lock:
            self._closed.set()
            informers = list(self._informers.values())
            self._informers.clear()
        for inf in informers:
            inf.stop()


class _Subscriber:
    """The events of one Service's watch, from the shared informers."""

    def __init__(self, key: tuple[str, str]) -> None:
        self.key = key   # the Service (namespace, name)
        self.q: queue.Queue[tuple[str, str, str, Any]] = queue.Queue(MAX_QUEUED)

    def put(self, item: tuple[str, str, str, Any]) -> None:
        try:
            self.q.put_nowait(item)
        except queue.Full:   # fell too far behind: restart from a fresh list
            with self.q.mutex:
                self.q.queue.clear()
            self.q.put_nowait((*item[:2], "error", KubernetesError(
                f"kubernetes: more than {MAX_QUEUED} route events queued for one watch")))

    def get(self) -> tuple[str, str, str, Any]:
        return self.q.get()


class _Informer:
    """The list+watch of one route kind in one namespace, shared by the watches of the
    Services there; it hands each of them the routes attached to its Service only (an
    index by parentRef, so that N Services and N routes cost N, not N squared)."""

    def __init__(self, source: KubernetesConfigSource, client: Client, namespace: str,
                 kind: str, watch_timeout: int) -> None:
        self.source = source
        self.client = client
        self.namespace = namespace
        self.kind = kind
        self.watch_timeout = watch_timeout
        self.path = (f"{AUTHZ_PATH if kind == authz.KIND else GROUP_PATH}/{namespace}/"
                     f"{_PLURAL[kind]}")
        self.keys = authz.targets if kind == authz.KIND else parents
        # name -> (object, the Services it attaches to); None: not listed yet
        self.objects: dict[str, tuple[Mapping[str, Any], frozenset[tuple[str, str]]]] | None
        self.objects = None
        self.subscribers: dict[tuple[str, str], set[_Subscriber]] = {}
        self.done = False
        self.stopped = threading.Event()
        self.error: Exception | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"k8s-{_PLURAL[kind]}-{namespace}")
        self._thread.start()

    def subscribe(self, sub: _Subscriber) -> None:
        with self._lock:
            if self.done:   # ended between the lookup and now: say so, the caller restarts
                sub.put((self.namespace, self.kind, "error", self.error or KubernetesError(
                    f"kubernetes: the watch of {_PLURAL[self.kind]} in ns "
                    f"{self.namespace} ended")))
                return
            self.subscribers.setdefault(sub.key, set()).add(sub)
            if self.objects is not None:
                sub.put((self.namespace, self.kind, "reset", self._attached(sub.key)))

    def unsubscribe(self, sub: _Subscriber) -> None:
        with self._lock:
            subs = self.subscribers.get(sub.key, set())
            subs.discard(sub)
            if not subs:
                self.subscribers.pop(sub.key, None)
            last = not self.subscribers
        if last:
            self.stop()

    def stop(self) -> None:
        with self.source._lock:
            if self.source._informers.get((self.namespace, self.kind)) is self:
                del self.source._informers[(self.namespace, self.kind)]
        self.done = True
        self.stopped.set()
        self.client.close()

    def _attached(self, key: tuple[str, str]) -> list[Mapping[str, Any]]:
        assert self.objects is not None
        return [obj for obj, keys in self.objects.values() if _concerns(keys, key)]

    def _concerned(self, keys: frozenset[tuple[str, str]]) -> set[tuple[str, str]]:
        """The subscribed Services ``keys`` concern (a namespace-wide policy: all there)."""
        if not any(name.startswith("*") for _, name in keys):
            return set(keys)
        return {k for k in self.subscribers if _concerns(keys, k)}

    def _change(self, op: str, name: str, obj: Mapping[str, Any]) -> None:
        """Apply one event and hand it to the Services it concerns (those it attaches to
        now, and those it attached to before: for them it is gone), atomically with
        respect to ``subscribe``."""
        with self._lock:
            assert self.objects is not None
            _, before = self.objects.pop(name, (None, frozenset()))
            now = self.keys(obj) if op == "put" else frozenset()
            if op == "put":
                self.objects[name] = (obj, now)
            after = self._concerned(now)
            for key in self._concerned(before) | after:
                for sub in self.subscribers.get(key, ()):
                    sub.put((self.namespace, self.kind, "put", obj) if key in after
                            else (self.namespace, self.kind, "delete", name))

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as e:   # every Service watch raises it; meshd backs off
            with self._lock:
                self.done, self.error = True, e
                if not self.client.closed:
                    for subs in self.subscribers.values():
                        for sub in subs:
                            sub.put((self.namespace, self.kind, "error", e))
        finally:
            self.stop()

    def _list(self) -> str | None:
        """List into ``objects`` and tell the subscribers; the resourceVersion, or None
        when the kind is not installed (404)."""
        what = f"listing {_PLURAL[self.kind]} in ns {self.namespace}"
        try:
            body = self.client.get(self.path, {}, what)
        except KubernetesError as e:
            if e.code != 404:
                raise
            body = {}
        items = body.get("items") or ()
        with self._lock:
            self.objects = {_name(o): (o, self.keys(o)) for o in items if isinstance(o, Mapping)}
            by_key: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
            for obj, keys in self.objects.values():
                for key in self._concerned(keys):
                    by_key.setdefault(key, []).append(obj)
            for key, subs in self.subscribers.items():
                for sub in subs:
                    sub.put((self.namespace, self.kind, "reset", by_key.get(key, [])))
        if self.source._status is not None:
            for obj in items:
                if isinstance(obj, Mapping):
                    self.source._status.offer(self.kind, self.namespace, obj)
        md = body.get("metadata")
        return str(md.get("resourceVersion") or "") or None if isinstance(md, Mapping) else None

    def _loop(self) -> None:
        ns, what = self.namespace, f"watching {_PLURAL[self.kind]} in ns {self.namespace}"
        rv: str | None = None
        listed = False
        quick_ends = broken = 0
        while not self.client.closed:
            if not listed:
                rv, listed = self._list(), True
                if rv is None:   # no such CRD: look again later
                    self.stopped.wait(self.watch_timeout)
                    listed = False
                    continue
            started, events = time.monotonic(), 0
            assert rv is not None
            stream = self.client.watch(self.path, {"resourceVersion": rv}, what,
                                       self.watch_timeout)
            try:
                for event in stream:
                    events += 1
                    rv = self._event(event, rv)
            except Gone:
                log.info("kubernetes: history expired %s; listing again", what)
                listed = False
                continue
            except StreamBroken as e:
                broken = broken + 1 if events == 0 else 1
                if broken > 1:
                    raise
                log.info("kubernetes: %s; watching %s in ns %s again from %s", e,
                         _PLURAL[self.kind], ns, rv)
            else:
                broken = 0
            finally:
                stream.close()
            quick_ends = quick_ends + 1 if events == 0 and time.monotonic() - started < 0.5 else 0
            if quick_ends >= 3:
                raise KubernetesError(f"kubernetes {self.client.s.server}: watch streams of "
                                      f"{_PLURAL[self.kind]} in ns {ns} end as soon as they "
                                      f"start")

    def _event(self, event: Mapping[str, Any], rv: str) -> str:
        kind, obj = event.get("type"), event.get("object") or {}
        if not isinstance(obj, Mapping):
            return rv
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone(f"kubernetes: {obj.get('message', 'resourceVersion too old')}", 410)
            raise KubernetesError(
                f"kubernetes {self.client.s.server}: {obj.get('code')} {obj.get('reason')} "
                f"watching {_PLURAL[self.kind]} in ns {self.namespace}: {obj.get('message')}",
                int(obj.get("code") or 0))
        md = obj.get("metadata")
        new_rv = str(md.get("resourceVersion") or rv) if isinstance(md, Mapping) else rv
        name = _name(obj)
        if kind in ("ADDED", "MODIFIED") and name:
            self._change("put", name, obj)
            if self.source._status is not None:
                self.source._status.offer(self.kind, self.namespace, obj)
        elif kind == "DELETED" and name:
            self._change("delete", name, obj)
        return new_rv   # BOOKMARK: only this


def _concerns(keys: frozenset[tuple[str, str]], key: tuple[str, str]) -> bool:
    """Does an object with ``keys`` (``routes.parents``, ``authz.targets``) concern the
    Service ``key``: named, or a namespace-wide ("*...") key of its namespace."""
    return key in keys or any(ns == key[0] and name.startswith("*") for ns, name in keys)


def _name(obj: Mapping[str, Any]) -> str:
    md = obj.get("metadata")
    return str(md.get("name") or "") if isinstance(md, Mapping) else ""


class _StatusWriter:
    """Writes route status (``status.patch``) with a client of its own, in a thread of
    its own, so that the watches never wait for it: the latest version of each route
    waits here (a newer one replaces it), and one whose status already says what meshd
    would is never queued. A 409 (the route changed meanwhile) or 404 (deleted) is
    dropped: its next version comes through the watch."""

    def __init__(self, source: KubernetesConfigSource) -> None:
        self.source = source
        self.pending: dict[tuple[str, str, str], tuple[str, Mapping[str, Any]]] = {}
        self.cond = threading.Condition()
        self.closed = False
        self.thread: threading.Thread | None = None
        self.client: Client | None = None
        self.written = 0

    def offer(self, kind: str, namespace: str, obj: Mapping[str, Any]) -> None:
        if status.patch(kind, obj) is None:
            return
        key = (kind, namespace, _name(obj))
        with self.cond:
            if self.closed or (key not in self.pending
                               and len(self.pending) >= MAX_STATUS_PENDING):
                return
            self.pending[key] = (kind, obj)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, daemon=True,
                                               name="k8s-route-status")
                self.thread.start()
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        if self.client is not None:
            self.client.close()

    def _run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.pending or self.closed)
                if self.closed:
                    return
                (kind, namespace, name), (_, obj) = self.pending.popitem()
            body = status.patch(kind, obj)
            if body is None:
                continue
            path = f"{GROUP_PATH}/{namespace}/{RESOURCE[kind]}/{name}/status"
            try:
                if self.client is None:
                    self.client = Client(self.source._conn._resolve(), self.source._conn.timeout)
                self.client.patch(path, body, f"writing the status of {kind} {namespace}/{name}")
                self.written += 1
            except KubernetesError as e:
                if e.code not in (404, 409):
                    log.warning("%s", e)
            except Exception:   # never end the thread: the next route may go through
                log.exception("kubernetes: writing the status of %s %s/%s", kind, namespace,
                              name)
