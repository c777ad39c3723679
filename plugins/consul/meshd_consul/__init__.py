"""The ``consul`` discovery plugin: endpoints from Consul's health API, kept current with
blocking queries.

```toml
[[discovery]]
name = "consul"
plugin = "consul"
address = "http://127.0.0.1:8500"        # the local agent; https with ca_file/cert_file/key_file
token_file = "/etc/meshd/consul.token"   # optional; re-read on every request
datacenter = "dc1"                       # optional; "web@dc2" names another per service
passing_only = true                      # false: warning instances too (never critical)
tags = ["prod"]                          # instances must carry all of them
node_meta = { rack = "r1" }
wait = "5m"                              # blocking-query wait (Consul caps it at 10m)
timeout = "10s"                          # per request, on top of wait + wait/16
min_interval = "100ms"                   # token bucket (burst 2) between queries
zone_meta = "zone"                       # service meta, else node meta, holding the zone
# TLS to the agent: ca_file = "...", cert_file = "...", key_file = "...", verify = true
```

The blocking-query rules are those of Consul's "Blocking Queries" page: an index lower
than the previous one resets to 0 (a full read restarts the loop); an index below 1 is
raised to 1 so the next query blocks; the loop is rate limited by a token bucket
(burst 2, one per ``min_interval``) rather than a sleep, so updates are not delayed in
the happy case. Reads filtered by ACLs (``X-Consul-Results-Filtered-By-ACLs``) with
nothing left are reported as an ACL denial, not as an empty service.

``watch("web")`` long-polls ``GET /v1/health/service/web`` and yields a ``Reset`` whenever
the endpoint set changes (not on every wake-up: a blocking query may return without a
change). Consul answers ``[]`` both for an unknown service and for one with no matching
healthy instance; only then is ``/v1/catalog/services`` asked, and a name absent there
gives ``NoSuchService``. Endpoint: host ``Service.Address`` or else ``Node.Address``,
port ``Service.Port``, weight ``Weights.Passing`` (``Weights.Warning`` while warning),
labels ``("tag", t)`` and ``("meta:KEY", v)``; service meta ``meshd-inbound-port`` marks
a meshed instance (``meshd-identity``: its SPIFFE ID).

Made-up names (a client's Host header) must not cost a connection each: ``knows(name)``
answers from one blocking query on ``/v1/catalog/services`` (``catalog.py``, started on
the first ``knows``), and once it runs, the watch of a local-datacenter name the catalog
lacks yields ``NoSuchService`` and waits for the name to appear there, without a query of
its own; ``web@dc2`` names another datacenter's catalog, which is not kept: those are
watched one by one (meshd's ``max_watches`` bounds them).

Errors (agent unreachable, 5xx, ACL) raise ``ConsulError`` naming the agent, the request
and the cause; meshd keeps the last endpoints and restarts the watch with backoff.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import consul
import requests

from meshd.discovery import Backend, NoSuchService, Reset, Update
from meshd.errors import MeshdError
from meshd_consul.catalog import Catalog
from meshd_consul.client import Client
from meshd_consul.entries import (
    META_IDENTITY,
    META_INBOUND_PORT,
    TokenBucket,
    next_index,
    to_endpoints,
)
from meshd_consul.options import ConsulOptions, parse_options, split_service

__all__ = ["ConsulBackend", "ConsulError"]

log = logging.getLogger("meshd.discovery.consul")

_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")]+)")
_GONE = object()  # the last state yielded was NoSuchService


class ConsulError(MeshdError):
    """Consul could not be asked, or refused: the message says which agent, request, why."""

    status = 503
    reason = "consul unavailable"


class ConsulBackend(Backend):
    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        super().__init__(name, options)
        self.opts: ConsulOptions = parse_options(options)
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._clients: set[Client] = set()
        self._catalog_client: Client | None = None
        o = self.opts
        self.catalog = Catalog(o.agent, o.datacenter, _go_duration(o.wait), o.min_interval,
                               self._closed, self._catalog_query, self._catalog_release)

    def services(self) -> Iterable[str]:
        return ()

    def knows(self, service: str) -> bool | None:
        """From the local datacenter's catalog (kept by one blocking query, started by the
        first call); another datacenter's names, and any before the first answer: None."""
        name, dc = split_service(service, self.opts.datacenter)
        if dc != self.opts.datacenter:
            return None
        return self.catalog.has(name)

    # -- the watch ---------------------------------------------------------------------

    def watch(self, service: str) -> Iterator[Update]:
        name, dc = split_service(service, self.opts.datacenter)
        local = dc == self.opts.datacenter
        gone = False
        while not self._closed.is_set():
            if local and self._catalog_lacks(name):
                if not gone:
                    gone = True
                    yield NoSuchService()
                if not self.catalog.wait_for(name):
                    return   # closed
            client = self._client()
            try:
                for update in self._loop(client, name, dc):
                    gone = isinstance(update, NoSuchService)
                    yield update
            except _Closed:
                return
            finally:
                self._forget(client)

    def _catalog_lacks(self, name: str) -> bool:
        """The running catalog watch does not list ``name`` (a first answer is waited for
        briefly; a catalog nobody asked for yet is not started: no knows() call, no use)."""
        if not self.catalog.started:
            return False
        if self.catalog.has(name, start=False) is None:
            self.catalog.wait_synced(min(self.opts.timeout, 5.0))
        return self.catalog.has(name, start=False) is False

    def _loop(self, client: Client, name: str, dc: str) -> Iterator[Update]:
        """Long-poll the service's health until the catalog (when kept) says it is gone."""
        index = 0
        last: object = None
        bucket = TokenBucket(self.opts.min_interval, now=time.monotonic())
        wait = _go_duration(self.opts.wait)
        while not self._closed.is_set():
            delay = bucket.reserve(time.monotonic())
            if delay and self._closed.wait(delay):
                return
            returned, entries = self._call(
                client, f"health/service/{name}", client.health.service, name,
                index=index, wait=wait, passing=self.opts.passing_only,
                tag=list(self.opts.tags) or None, dc=dc or None,
                node_meta=dict(self.opts.node_meta) or None)
            filtered = client.header("X-Consul-Results-Filtered-By-ACLs").lower() == "true"
            new_index = next_index(index, returned)
            if new_index == 0 and index:
                log.info("consul %s: index of %s went backwards (%d -> %d); full read",
                         self.opts.agent, name, index, returned)
                index = 0
                continue
            index = new_index
            state: object
            if entries:
                state = to_endpoints(entries, self.opts.zone_meta, self.opts.passing_only)
            elif filtered:
                raise ConsulError(f"consul {self.opts.agent}: ACL denied for health/service/"
                                  f"{name} (results filtered by ACLs: the token lacks "
                                  f"service:read/node:read)")
            else:
                known = self._catalog_knows(name, dc, returned)
                if known is False:
                    yield NoSuchService()   # watch() waits on the catalog: no query held
                    return
                state = () if known or self._exists(client, name, dc) else _GONE
            if state != last:
                last = state
                if state is _GONE:
                    yield NoSuchService()
                else:
                    assert isinstance(state, tuple)
                    yield Reset(state)

    def _catalog_knows(self, name: str, dc: str, index: int) -> bool | None:
        """The kept catalog's answer when it is of this datacenter and at least as recent
        as the health answer at ``index``; else None (ask the agent)."""
        if dc != self.opts.datacenter or self.catalog.index < index:
            return None
        return self.catalog.has(name, start=False)

    def _catalog_query(self, index: int) -> tuple[int, Any, bool]:
        client = self._catalog_client   # only the catalog's thread sets it
        if client is None:
            client = self._catalog_client = self._client()
        try:
            returned, services = self._call(
                client, "catalog/services", client.catalog.services, index=index,
                wait=self.catalog.wait, dc=self.opts.datacenter or None)
        except _Closed:
            raise ConsulError("closed") from None
        filtered = client.header("X-Consul-Results-Filtered-By-ACLs").lower() == "true"
        return returned, services, filtered

    def _catalog_release(self) -> None:
        with self._lock:
            client, self._catalog_client = self._catalog_client, None
        if client is not None:
            self._forget(client)

    def _exists(self, client: Client, name: str, dc: str) -> bool:
        _, services = self._call(client, "catalog/services", client.catalog.services,
                                 dc=dc or None)
        if not services and client.header("X-Consul-Results-Filtered-By-ACLs").lower() == "true":
            raise ConsulError(f"consul {self.opts.agent}: ACL denied for catalog/services "
                              f"(results filtered by ACLs: the token lacks service:read)")
        return name in (services or {})

    def _call(self, client: Client, what: str, fn: Any, *args: Any,
              **kwargs: Any) -> tuple[int, Any]:
        where = f"consul {self.opts.agent}"
        token = self._token()
        try:
            index, data = fn(*args, token=token, **kwargs)
        except consul.ACLPermissionDenied as e:
            raise ConsulError(f"{where}: ACL denied for {what} (403 {_first_line(e)})") from None
        except consul.ACLDisabled as e:
            raise ConsulError(f"{where}: ACL denied for {what} (401 {_first_line(e)})") from None
        except consul.ConsulException as e:
            raise ConsulError(f"{where}: {what} failed ({_first_line(e)})") from None
        except requests.RequestException as e:
            if self._closed.is_set():
                raise _Closed() from None
            raise ConsulError(f"{where}: unreachable for {what} ({_cause(e)})") from None
        try:
            return int(index), data
        except (TypeError, ValueError):
            raise ConsulError(f"{where}: bad X-Consul-Index {index!r} for {what}") from None

    def _token(self) -> str | None:
        path = self.opts.token_file
        if not path:
            return None
        try:
            with open(path, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            raise ConsulError(f"consul token_file {path}: {e.strerror}") from None
        return token or None

    def _client(self) -> Client:
        o = self.opts
        verify: bool | str = (o.ca_file or True) if o.verify else False
        client = Client(host=o.host, port=o.port, scheme=o.scheme, verify=verify,
                        cert=(o.cert_file, o.key_file) if o.cert_file else None,
                        connections_timeout=o.timeout)
        with self._lock:
            self._clients.add(client)
            closed = self._closed.is_set()
        if closed:
            client.abort()
        return client

    # -- registering the local app (optional helper) ----------------------------------

    def register_local(self, service: str, port: int, *, inbound_port: int = 0,
                       identity: str = "", address: str = "", service_id: str = "",
                       tags: Sequence[str] = (), meta: Mapping[str, str] | None = None,
                       weight: int = 1, ready_url: str = "http://127.0.0.1:4191/ready",
                       interval: str = "10s", deregister_after: str = "1m") -> str:
        """Register the local app with the agent (``PUT /v1/agent/service/register``), with
        an HTTP check on meshd's admin ``/ready``: while this meshd is not ready, Consul
        marks the instance critical and peers stop routing to it. ``inbound_port`` (and
        ``identity``) make it a meshed endpoint for other meshd instances. Returns the
        service ID. Consul starts the check critical until its first pass."""
        sid = service_id or f"{service}-{port}"
        full_meta = dict(meta or {})
        if inbound_port:
            full_meta[META_INBOUND_PORT] = str(inbound_port)
            if identity:
                full_meta[META_IDENTITY] = identity
        check = consul.Check.http(ready_url, interval, timeout="5s", deregister=deregister_after)
        client = self._client()
        try:
            self._call(client, "agent/service/register", _with_index(client.agent.service.register),
                       service, service_id=sid, address=address or None, port=port,
                       tags=list(tags) or None, meta=full_meta or None, check=check,
                       weights={"Passing": weight, "Warning": 1})
        finally:
            self._forget(client)
        return sid

    def deregister_local(self, service_id: str) -> None:
        client = self._client()
        try:
            self._call(client, f"agent/service/deregister/{service_id}",
                       _with_index(client.agent.service.deregister), service_id)
        finally:
            self._forget(client)

    def _forget(self, client: Client) -> None:
        with self._lock:
            self._clients.discard(client)
        client.abort()

    def close(self) -> None:
        """End every running watch promptly: the flag stops the loop between queries and
        the queries in flight are cut (their sockets shut)."""
        self._closed.set()
        self.catalog.close()
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            client.abort()


class _Closed(Exception):
    """A query cut by close(): the watch ends quietly instead of failing."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _with_index(fn: Any) -> Any:
    """A py-consul write (it answers a bool) in the (index, data) shape _call expects."""
    def call(*args: Any, **kwargs: Any) -> tuple[int, Any]:
        ok = fn(*args, **kwargs)
        if not ok:
            raise consul.ConsulException("the agent did not accept the request")
        return 0, ok
    return call


def _cause(e: requests.RequestException) -> str:
    """The root of a requests error ("Connection refused"), not urllib3's retry wrapper."""
    if isinstance(e, requests.Timeout):
        return f"no answer in time: {type(e).__name__}"
    text = str(e)
    found = _ERRNO.search(text)
    if found:
        return found[1]
    if "RemoteDisconnected" in text or "Connection aborted" in text:
        return "the agent closed the connection without answering"
    return f"{type(e).__name__}: {_first_line(e)}"


def _go_duration(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"

