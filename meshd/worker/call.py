"""What every proxied request does whatever its protocol (HTTP/1.1 or HTTP/2): find its
service through the routing rules and failover, its endpoints and metric row, its
consistent-hash key, and whether a failed attempt may be sent again.

``Call`` is one client request across its attempts, and ``Call.run`` its one attempt
loop, whatever the client and the upstream speak: ``start_attempt`` picks the endpoint
and the attempt's deadlines, an ``UpstreamExchange`` (``meshd.worker.upstream.exchange``)
goes over HTTP/1.1 or an HTTP/2 stream, the balancer is told how each attempt went, and
``connect_failed`` and ``may_retry`` classify a failure and decide whether the request is
sent again (``RetryNow``: the rule is ``meshd.balance.retry.attempt_refusal``'s, then the
deadline and the shared budget). The client side (``ClientSide``: an HTTP/1.1 connection's
request, an HTTP/2 stream) only translates the request in and the response out.
``meshd-error`` is meshd's alone: ``meshd.proto.translate.strip_meshd_error`` removes an
upstream's; ``error_answer`` is meshd's own answer for either client side, and
``public_reason`` what it says (nothing internal on inbound listeners).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

import gevent

from meshd import rowkeys
from meshd.balance.retry import attempt_refusal
from meshd.config import DEFAULT_SERVICE
from meshd.discovery.api import Endpoint
from meshd.errors import (
    NoEndpoints,
    NoRoute,
    NoService,
    NotSent,
    ProtocolUnavailable,
    ProxyError,
    StreamRefused,
    UpstreamError,
    UpstreamTimeout,
)
from meshd.fleet.select import in_subset
from meshd.proto import grpc_status
from meshd.proto.translate import MESHD_ERROR
from meshd.ratelog import Throttle
from meshd.shm import (
    F_LABEL_OVERFLOW,
    F_REFUSED_RETRY,
    F_REQUESTS,
    LABEL_OVERFLOW,
    ROW_OVERFLOW,
    ROW_UNKNOWN,
)
from meshd.worker.decisions import attempt_ended
from meshd.worker.peer import PLAINTEXT, Peer
from meshd.worker.retries import IDEMPOTENT
from meshd.worker.routing import Policy
from meshd.worker.upstream.exchange import H2Exchange
from meshd.worker.upstream.mesh_tls import mesh_target

if TYPE_CHECKING:
    from meshd.config import ListenerConfig, ServiceConfig
    from meshd.snapshot import Snapshot
    from meshd.worker.context import Context
    from meshd.worker.upstream.exchange import UpstreamExchange
    from meshd.worker.upstream.h2 import H2Stream
    from meshd.worker.upstream.http1 import UpstreamConn
    from meshd.worker.upstream.tls import TlsTarget

log = logging.getLogger("meshd.worker")
# A client triggers error answers at will (malformed heads, unknown services): their log
# lines go through this, keyed by listener name and error kind.
quiet = Throttle(log)

Headers = Sequence[tuple[bytes, bytes]]
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class RetryNow(Exception):
    """This attempt failed in a way another endpoint may not, and the retry rules allow
    another: the protocol module's request loop sends the request again."""


class ClientSide(Protocol[T_co]):
    """What a client side (HTTP/1.1 connection, HTTP/2 stream) does for an attempt: it
    translates the request in (an HTTP/1.1 exchange with the head it built, or the head
    of an HTTP/2 stream), sends the client's body through the exchange whatever it goes
    over (``send_body``), and relays the response out (``respond``), reading it through
    the exchange too."""

    @property
    def grpc(self) -> bool: ...               # the request needs HTTP/2 upstream (gRPC)
    @property
    def has_body(self) -> bool: ...
    @property
    def response_started(self) -> bool: ...   # a byte of the response reached the client

    def http1_exchange(self, call: Call, conn: UpstreamConn) -> UpstreamExchange: ...

    def h2_head(self, https: bool, meshed: bool) -> tuple[list[tuple[bytes, bytes]], bool]:
        """The HTTP/2 request head, and whether it is valid by construction."""
        ...

    def send_body(self, ex: UpstreamExchange) -> bool:
        """The client's body through ``ex.send_body`` (in the attempt's sender greenlet):
        True when all of it went."""
        ...

    def respond(self, call: Call, ex: UpstreamExchange, status: int) -> T_co:
        """Relay the response (its head received, not a failure to retry)."""
        ...

    def client_fault(self, e: BaseException) -> BaseException | None:
        """What to raise instead when the attempt failed through the client's fault (its
        body broke, it went away), else None."""
        ...


class Call:
    """One client request across its attempts."""

    __slots__ = ("service", "svc", "endpoints", "policy", "deadline", "row", "replay",
                 "hash_key", "tried", "method", "pick", "sent_at", "status",
                 "kind", "error", "no_retry")

    def __init__(self, worker: Context, service: str, endpoints: tuple[Endpoint, ...],
                 policy: Policy, deadline: float, row: int, method: bytes, headers: Headers,
                 peer: Callable[[], bytes]) -> None:
        self.service = service
        self.svc: ServiceConfig | None = worker.config.services.get(service)
        self.endpoints = endpoints
        self.policy = policy
        self.deadline = deadline      # the whole request, retries included
        self.row = row
        # idempotent (RFC 9110 §9.2.2), or its route says it may be retried
        self.replay = policy.retryable or method in IDEMPOTENT
        self.method = method
        svc = self.svc
        self.hash_key = (hash_key(svc, headers, peer)
                         if svc is not None and svc.balancer == "consistent_hash" else None)
        self.tried: list[int] = []
        # The current attempt, for its balancer decisions record (meshd.worker.decisions):
        # what the balancer saw (None once recorded), when it was sent, its response
        # status (0: none), failure kind ("" none), error, and why it was not retried.
        self.pick: tuple[object, ...] | None = None
        self.sent_at = 0.0
        self.status = 0
        self.kind = ""
        self.error: BaseException | None = None
        self.no_retry = ""

    def body_replayable(self) -> bool:
        """Whether the body (if any) can still be sent again. Protocols that keep bodies
        for replay override this."""
        return True

    def start_attempt(self, worker: Context) -> tuple[Endpoint, int, float, float]:
        """(endpoint, its shm row, when the attempt starts, its deadline) of the next
        attempt, counted in flight. A retry goes to an endpoint not tried yet, when there
        is one; the attempt's deadline is the sooner of ``try_timeout`` and the call's."""
        snap = worker.snapshot
        balancer = worker.balancer
        service = self.service
        splits = snap.splits
        index, row = balancer.pick(service, self.endpoints, snap.endpoint_rows, self.svc,
                                   splits[service] if service in splits else None,
                                   self.hash_key, self.tried)
        self.tried.append(index)
        self.pick = balancer.last
        self.status, self.kind, self.error, self.no_retry = 0, "", None, ""
        if row >= 0:  # balancer.started(row), inline
            balancer.stripe.started(row)
        now = self.sent_at = time.monotonic()
        try_timeout = self.policy.try_timeout
        try_deadline = self.deadline
        if try_timeout and now + try_timeout < try_deadline:
            try_deadline = now + try_timeout
        return self.endpoints[index], row, now, try_deadline

    def connect_timeout(self, now: float) -> float:
        """The connect timeout, cut short by what is left of the call's deadline."""
        return min(self.policy.connect_timeout, max(self.deadline - now, 0.001))

    def run(self, worker: Context, side: ClientSide[T]) -> T:
        """Attempts until one ends without ``RetryNow``, each told whether another may
        follow, a backoff pause between them (within the call's deadline)."""
        attempt = 0
        while True:
            try:
                return self.attempt(worker, side, attempt < self.policy.retries)
            except RetryNow:
                attempt_ended(worker, self, True)
                attempt += 1
                pause = min(worker.retries.backoff(attempt), self.deadline - time.monotonic())
                if pause > 0:
                    gevent.sleep(pause)
            except BaseException as e:
                attempt_ended(worker, self, False, e)
                raise

    def attempt(self, worker: Context, side: ClientSide[T], attempts_left: bool) -> T:
        """One attempt, whatever the client and the upstream speak: the endpoint picked
        and counted in flight, an exchange opened over HTTP/1.1 or an HTTP/2 stream (a
        failure to open one is a connect failure), the response head awaited and
        classified, then handed to the client side; the balancer told how it went.
        Raises ``RetryNow`` when the attempt failed before any response byte reached
        the client and the retry rules allow another."""
        ep, row, sent_at, try_deadline = self.start_attempt(worker)
        svc = self.svc
        address: tuple[str, int] | None = None
        if (ep.meshed or side.grpc
                or svc is not None and (svc.tls is not None or svc.protocol == "h2")):
            proto, address, tls = self.protocol(worker, ep, row, side.grpc, attempts_left)
        else:  # plaintext HTTP/1.1 (what upstream_protocol says, without asking it)
            proto, tls = "http1", None
        conn = None
        if proto == "http1":
            conn = self.acquire(worker, ep, row, sent_at, side.has_body, tls, attempts_left)
        ex: UpstreamExchange
        if conn is not None:
            ex = side.http1_exchange(self, conn)
        else:  # HTTP/2: gRPC, a meshed peer, protocol = "h2", or ALPN chose h2
            if address is None:  # a new TLS connection that selected ALPN h2
                address = ep.address
            meshed = proto == "meshed"
            # a meshed hop keeps the client's scheme: its TLS is the mesh's, not the app's
            head, checked = side.h2_head(tls is not None and not meshed, meshed)
            stream = self.open_h2(worker, address, head, not side.has_body, sent_at, tls, row,
                                  attempts_left, checked, meshed)
            ex = H2Exchange(stream, side.send_body if side.has_body else None,
                            self.policy.idle_timeout, meshed)
        policy = self.policy
        failed = True
        rtt: float | None = None
        try:
            ex.start()
            status = self.status = ex.response(try_deadline, self.deadline)
            rtt = time.monotonic() - sent_at
            kind = self.kind = status_kind(status) if status >= 400 else ""
            grpc: int | None = None
            if side.grpc and not kind:  # a trailers-only answer: its status is in the head
                grpc = grpc_status.code(ex.h2_head())
                if grpc:
                    kind = self.kind = "grpc"
            failed = kind in policy.failure_on
            if (failed and (grpc is None or grpc in grpc_status.RETRYABLE)
                    and may_retry(worker, self, kind, attempts_left)):
                raise RetryNow()
            attempt_ended(worker, self, False)   # before the body: a long stream shows now
            answered = side.respond(self, ex, status)
            if side.grpc and grpc is None and not failed and "grpc" in policy.failure_on:
                failed = bool(grpc_status.code(ex.trailers))  # known once the trailers came
            return answered
        except BaseException as error:
            e: BaseException = error
            ex.abort()
            if isinstance(e, RetryNow):
                raise
            fault = side.client_fault(e)
            if fault is not None:  # the client's fault, not the endpoint's
                failed = False
                self.kind = "client"
                if fault is e:
                    raise
                raise fault from None
            if isinstance(e, (OSError, ProxyError)) and not side.response_started:
                kind = self.kind = error_kind(e)
                self.error = e
                failed = counts_as_failure(kind, policy.failure_on)
                if may_retry(worker, self, kind, attempts_left):
                    raise RetryNow() from None
                if isinstance(e, OSError):
                    e = UpstreamError(f"connection to {ex.endpoint} failed: "
                                      f"{e.strerror or e}")
                if kind == "reset" and type(e) is UpstreamError:
                    raise self.lost(e) from None
                if e is not error:
                    raise e from None
            raise
        finally:
            worker.balancer.finished(row, rtt, failed, self.svc)

    def lost(self, e: UpstreamError) -> UpstreamError:
        """The error of an attempt that failed after its request went (so perhaps
        processed) and is not sent again: it says so, and for a method that is not
        idempotent, why it is not retried."""
        if self.replay:
            return UpstreamError(f"response lost: {e.reason}")
        method = self.method.decode("latin-1")
        return UpstreamError(f"response lost, {method} not retried (it may have been "
                             f"processed): {e.reason}")

    def protocol(self, worker: Context, ep: Endpoint, row: int, grpc: bool,
                 attempts_left: bool) -> tuple[str, tuple[str, int], TlsTarget | None]:
        """``upstream_protocol`` for this attempt; a failure is a connect failure."""
        try:
            return upstream_protocol(worker, self, ep, grpc)
        except BaseException as e:
            connect_failed(worker, self, row, e, attempts_left)
            raise

    def acquire(self, worker: Context, ep: Endpoint, row: int, sent_at: float, check: bool,
                tls: TlsTarget | None, attempts_left: bool) -> UpstreamConn | None:
        """A pooled or new HTTP/1.1 connection for this attempt (a failure is a connect
        failure), or None when it was a new TLS connection on which the endpoint selected
        ALPN h2: it went to the HTTP/2 pool, and the attempt goes HTTP/2."""
        try:
            svc = self.svc
            conn = worker.pool.acquire(ep, self.connect_timeout(sent_at), check=check,
                                       idle_timeout=self.policy.idle_timeout, row=row,
                                       limit=svc.max_connections if svc else 0, tls=tls)
            if conn.alpn != "h2":
                conn.max_idle = self.policy.idle_timeout  # the reaper closes it past this
                conn.metric_row = self.row   # the row its events count on
                return conn
            assert tls is not None
            worker.h2pool.adopt(conn.detach(), ep.address, tls, self.connect_timeout(sent_at))
            return None
        except BaseException as e:
            connect_failed(worker, self, row, e, attempts_left)
            raise

    def open_h2(self, worker: Context, address: tuple[str, int],
                headers: list[tuple[bytes, bytes]], end_stream: bool, sent_at: float,
                tls: TlsTarget | None, row: int, attempts_left: bool,
                checked: bool = False, meshed: bool = False) -> H2Stream:
        """A stream on the worker's HTTP/2 pool for this attempt (a failure to get one is
        a connect failure). ``checked``: the head is valid by construction. Only a peer
        meshd (``meshed``) is PINGed: gRPC servers take PINGs more often than every few
        minutes for abuse (grpc-core's too_many_pings GOAWAY)."""
        try:
            ping = (self.svc or DEFAULT_SERVICE).ping_timeout if meshed else 0.0
            stream = worker.h2pool.stream(
                address, headers, end_stream, self.connect_timeout(sent_at), tls,
                checked=checked, idle_timeout=self.policy.idle_timeout, ping_timeout=ping,
                row=self.row)
            # A silent peer's waiting stream is abandoned only if it may go elsewhere.
            stream.retry_safe = attempts_left and self.replay and self.body_replayable()
            return stream
        except BaseException as e:
            connect_failed(worker, self, row, e, attempts_left)
            raise


def require_endpoints(service: str, endpoints: tuple[Endpoint, ...] | None,
                      policy: Policy, snapshot: Snapshot) -> tuple[Endpoint, ...]:
    """The endpoints ``route`` found, or the error a client gets: no source knows the
    service or its source fails (NoService, the snapshot says which), or neither it nor
    its failover services have any (NoEndpoints). A request the service's fleet routes
    reject (GAMMA) gets NoRoute, a 404, first."""
    if policy.reject:
        raise NoRoute(policy.reject)
    if endpoints is None:
        raise NoService(snapshot.unknown_reason(service))
    if not endpoints:
        tried = (policy.service, *policy.failover)
        raise NoEndpoints(f"service {service!r} has no endpoints" if len(tried) == 1 else
                          f"no endpoints in {', '.join(tried)}")
    return endpoints


def route(worker: Context, listener: ListenerConfig, method: bytes, authority: bytes | None,
          target: bytes, headers: Headers,
          redirected: Callable[[], tuple[str, int] | None] | None = None,
          peer: Peer = PLAINTEXT) -> tuple[str, tuple[Endpoint, ...] | None, int, Policy]:
    """(service, its endpoints or None when unknown, metric row, policy): the routing
    rules pick the service, and its failover list stands in when it has no endpoints.
    ``authority`` is the Host (or :authority, or a CONNECT target).

    ``redirected``: the connection's original destination when iptables redirected it
    to this listener, else None (asked only when needed). A request whose Host no
    discovery source knows goes there, as the application meant it to (transparent
    capture in a pod), counted on the listener's own row (service "").

    The metric row is that of the service and, with ``[identity]``, of the mTLS peer
    (``meshd.rowkeys``): the client (``peer``) inbound, the endpoints' identity outbound."""
    if listener.direction == "inbound":
        assert listener.forward is not None
        service = str(listener.forward)
        policy = worker.router.policy(service, None)
        endpoints: tuple[Endpoint, ...] | None = (
            Endpoint(listener.forward.host, listener.forward.port),)
    else:
        if listener.service:
            host = listener.service
        elif authority and b":" not in authority and authority[:1] != b"[":  # no port: as is
            host = authority.decode("latin-1")
        else:
            host = strip_port((authority or b"").decode("latin-1"))
        if worker.config.config_sources and not worker.router.local(host) and not _ip_literal(host):
            # A name seen for the first time: its fleet policy comes with its endpoints
            # (the control process publishes both at once), so wait for those first.
            worker.resolve(host)
        policy = worker.router.request_policy(listener.name, host, method, target, headers)
        service = policy.service
        if (redirected is not None and not listener.service
                and service not in worker.snapshot.services and _ip_literal(service)):
            # An address, not a name: no source is asked for it (an on-demand watch per
            # address the application calls would be waited for and then refused).
            endpoints = None
        else:
            # a service in the snapshot is resolve()'s first answer: asked only otherwise
            endpoints = worker.snapshot.services.get(service)
            if endpoints is None:
                endpoints = worker.resolve(service)
            if endpoints and policy.labels:   # a fleet subset
                endpoints = tuple(e for e in endpoints if in_subset(policy.labels, e.labels))
            if not endpoints:
                for i, other in enumerate(policy.failover):
                    found = worker.resolve(other)
                    if found and policy.failover_labels and policy.failover_labels[i]:
                        found = tuple(e for e in found
                                      if in_subset(policy.failover_labels[i], e.labels))
                    if found:
                        service, endpoints = other, found
                        break
        if endpoints is None and redirected is not None and not listener.service:
            dst = redirected()
            if dst is not None:
                return _original_destination(worker, listener, dst)
    if endpoints is None:
        return service, None, ROW_UNKNOWN, policy
    if listener.direction == "inbound":
        return (service, endpoints, inbound_row(worker, listener, service, peer, authority),
                policy)
    return (service, endpoints, outbound_row(worker, listener, service, endpoints, authority),
            policy)


def inbound_row(worker: Context, listener: ListenerConfig, service: str, peer: Peer,
                authority: bytes | None = None) -> int:
    """The metric row of an inbound request or connection from ``peer``: its own rows for
    an mTLS peer of a listener with mTLS, asked of the control process the first time
    (meanwhile, and past the bound, client_id="other"); of the request's ``authority``
    when it has one (``authority_row``)."""
    snap = worker.snapshot
    if not peer.tls or listener.mtls == "off":
        row_key = service
        row = snap.row(listener.name, service)
    else:
        row_key = rowkeys.key(service, True, peer.client_id)
        row = snap.row(listener.name, row_key)
        if row is None:
            if peer.client_id:
                worker.ask_row(listener.name, peer.client_id)
            row_key = rowkeys.key(service, True, rowkeys.OTHER)
            row = snap.row(listener.name, row_key)
    if row is None:
        return ROW_OVERFLOW
    return row if authority is None else authority_row(worker, listener, row_key, row, authority)


def outbound_row(worker: Context, listener: ListenerConfig, service: str,
                 endpoints: Sequence[Endpoint], authority: bytes | None = None) -> int:
    """The metric row of an outbound request to ``service`` over ``endpoints`` (with
    ``[identity]``: by the server identity they share, assigned up front), and of its
    ``authority`` (``authority_row``)."""
    row_key = (service if worker.config.identity is None  # outbound_key's answer then
               else rowkeys.outbound_key(True, service, endpoints))
    row = worker.snapshot.row(listener.name, row_key)
    if row is None:
        return ROW_OVERFLOW
    return row if authority is None else authority_row(worker, listener, row_key, row, authority)


# (listener, base key, authority as sent) -> its row, in the snapshot _found_in[0]: the
# rows found, so that a request of a known authority costs one lookup, not a parse.
# Bounded: only rows that exist (at most MAX_AUTHORITY_ROWS per listener) under the
# spellings clients used (case, up to MAX_FOUND of them).
MAX_FOUND = 4096
_found: dict[tuple[str, str, bytes], int] = {}
_found_in: list[object] = [None]


def authority_row(worker: Context, listener: ListenerConfig, base_key: str, row: int,
                  authority: bytes) -> int:
    """The row of the requests of ``base_key``'s row (``row``) that name ``authority``,
    when it has one; else ``row`` (authority="_other"), and the control process is asked
    for one -- unless the listener has ``MAX_AUTHORITY_ROWS`` already: the request is
    then counted as an overflow on the listener's own row (``meshd.rowkeys``)."""
    snap = worker.snapshot
    if _found_in[0] is not snap:  # rows are found again in each new snapshot
        _found.clear()
        _found_in[0] = snap
    seen = _found.get((listener.name, base_key, authority))
    if seen is not None:
        return seen
    name = rowkeys.authority_of(authority)
    if not name:
        return row
    own = snap.row(listener.name, rowkeys.with_authority(base_key, name))
    if own is not None:
        if len(_found) < MAX_FOUND:
            _found[(listener.name, base_key, authority)] = own
        return own
    if worker.authority_rows(listener.name) >= rowkeys.MAX_AUTHORITY_ROWS:
        counted = snap.row(listener.name, "")
        worker.stripe.add(ROW_OVERFLOW if counted is None else counted,
                          F_LABEL_OVERFLOW + LABEL_OVERFLOW.index("authority"))
    else:
        worker.ask_authority_row(listener.name, base_key, name)
    return row


def count_route_request(worker: Context, listener: ListenerConfig, policy: Policy) -> int:
    """Count the request on the row of the route it matched (a ``[[route]]`` or a
    config source's: ``route_*`` metrics) and return that row, -1 when it matched none.
    A route without a row (past ``MAX_ROUTE_ROWS``) counts under the listener's
    ``_overflow`` route row, and as an overflow on the listener's own row."""
    if not policy.route_key:
        return -1
    snap = worker.snapshot
    row = snap.row(listener.name, policy.route_key)
    if row is None:
        counted = snap.row(listener.name, "")
        worker.stripe.add(ROW_OVERFLOW if counted is None else counted,
                          F_LABEL_OVERFLOW + LABEL_OVERFLOW.index("route"))
        row = snap.row(listener.name, rowkeys.OVERFLOW_KEY)
        if row is None:
            return -1
    worker.stripe.add(row, F_REQUESTS)
    return row


def record_response(worker: Context, row: int, route_at: int, status: int, took: float,
                    failure: bool, grpc: int = -1) -> None:
    """One response on the request's row and, when it matched a ``[[route]]``, on the
    route's row (``count_route_request``)."""
    worker.stripe.record_response(row, status, took, failure, grpc)
    if route_at >= 0:
        worker.stripe.record_response(route_at, status, took, failure, grpc)


def _original_destination(worker: Context, listener: ListenerConfig, dst: tuple[str, int],
                          ) -> tuple[str, tuple[Endpoint, ...], int, Policy]:
    """The route of a redirected request no source knows: its original destination,
    with the default service settings, counted on the listener's row. The service is ""
    so that the balancer keeps one state for all such requests, not one per address."""
    row = worker.snapshot.row(listener.name, "")
    policy = worker.router.policy("", None)
    return "", (Endpoint(dst[0], dst[1]),), ROW_OVERFLOW if row is None else row, policy


def _ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def hash_key(svc: ServiceConfig | None, headers: Headers,
             peer: Callable[[], bytes]) -> bytes | None:
    """The consistent-hash key of a request to a service, None when it has none (the
    peer's address is only looked up for services hashing on it)."""
    if svc is None or svc.balancer != "consistent_hash":
        return None
    if svc.hash_on == "client_address":
        return peer()
    name = svc.hash_on[7:].encode()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None  # no key: balanced like p2c


def status_kind(status: int) -> str:
    """The failure kind of a response status ("" for none): see ``failure_on``."""
    return "5xx" if status >= 500 else "4xx" if status >= 400 else ""


def error_kind(e: BaseException) -> str:
    """The failure kind of an attempt that broke after its connection was made:
    "refused" (an HTTP/2 peer refused the stream: never processed), "unsent" (a write
    failed before any byte of the request went), "timeout", or "reset" (the request
    went, the response was lost)."""
    if isinstance(e, UpstreamTimeout):
        return "timeout"
    if isinstance(e, StreamRefused):
        return "refused"
    if isinstance(e, NotSent):
        return "unsent"
    return "reset"


def counts_as_failure(kind: str, failure_on: frozenset[str]) -> bool:
    """Whether an attempt that failed with ``kind`` counts against its endpoint: a
    refused stream does not (a peer reloading refuses streams by design); one never
    sent counts as a connect failure."""
    if kind == "refused":
        return False
    return ("connect" if kind == "unsent" else kind) in failure_on


def connect_failed(worker: Context, call: Call, row: int, e: BaseException,
                   attempts_left: bool) -> None:
    """The attempt's connection could not be made: count it for the endpoint, and raise
    ``RetryNow`` when the request may go elsewhere (nothing of it was sent)."""
    # Not every failed attempt is the endpoint's fault: one that cannot speak what this
    # request needs serves others well, and meshd's own setup may have failed.
    counted = "connect" in call.policy.failure_on and getattr(e, "endpoint_fault", True)
    call.kind, call.error = "connect", e
    worker.balancer.finished(row, None, counted, call.svc)
    if isinstance(e, ProxyError) and may_retry(worker, call, "connect", attempts_left):
        raise RetryNow() from None


def may_retry(worker: Context, call: Call, kind: str, attempts_left: bool) -> bool:
    """An attempt failed (``kind``: connect, unsent, refused, reset, timeout, 5xx, 4xx)
    before any response byte reached the client: may the request go to another endpoint?
    One whose bytes never left meshd (connect failed, or its first write failed) or
    that an HTTP/2 peer refused (never processed) may, whatever its method, if its body
    can be sent again; one that reached an upstream only when it is replayable
    (idempotent or marked retryable, body kept). The shared budget is spent when it may."""
    refused = attempt_refusal(kind, call.policy.failure_on, attempts_left, call.replay,
                              call.body_replayable())
    if refused is not None:
        call.no_retry = refused.value
        return False
    now = time.monotonic()
    if now >= call.deadline:
        call.no_retry = "deadline"
        return False
    if not worker.retries.try_retry(call.row, worker.balancer.live_slots(now), now):
        call.no_retry = "budget"
        return False
    if kind == "refused":   # meshd_upstream_refused_retries_total
        worker.stripe.add(call.row, F_REFUSED_RETRY)
    return True


def error_answer(err: ProxyError, listener: ListenerConfig, protocol: str = "",
                 ) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """meshd's own answer to a request it could not proxy: (its fields, with
    ``meshd-error``; its body, the public reason on one line), logged through the
    throttle (a client causes these at will). ``protocol``: for the log line."""
    level = logging.INFO if err.status < 500 else logging.WARNING
    name = listener.name
    quiet.log(level, f"{name}: {type(err).__name__}", "%s %s%s: %s", name, err.status,
              protocol and f" ({protocol})", err.reason)
    reason = public_reason(err, listener)
    body = reason.encode("utf-8", "replace") + b"\n"
    return [(b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Content-Length", b"%d" % len(body)),
            (MESHD_ERROR, reason.encode("ascii", "replace")[:200])], body


def public_reason(err: ProxyError, listener: ListenerConfig) -> str:
    """The reason meshd's error answer gives the client: the error's own, except for a
    5xx on an inbound listener, whose client is another host and whose detail may name
    internal addresses ("connect to 127.0.0.1:8080 failed"): there, only the kind of
    error (its class's reason); the log keeps the detail."""
    if listener.direction == "inbound" and err.status >= 500:
        return type(err).reason
    return err.reason


def upstream_protocol(worker: Context, call: Call, ep: Endpoint, grpc: bool,
                      ) -> tuple[str, tuple[str, int], TlsTarget | None]:
    """("http1" | "h2" | "meshed", address, TLS target or None) for a request to ``ep``.

    An endpoint fronted by meshd (discovery says meshed, with its inbound port) gets
    HTTP/2 to that port, multiplexed: over mTLS when this meshd has ``[identity]`` and
    discovery gives the endpoint an identity (``upstream.mesh_tls``; its handshakes are
    counted on the call's row), else plaintext h2c. A service with ``[service.X.tls]``
    reaches its endpoints over TLS: ``protocol = "h2"`` needs ALPN h2; otherwise the
    endpoint's remembered ALPN choice decides ("h2": the HTTP/2 pool; "http/1.1" or not
    known yet: the HTTP/1.1 pool, whose new connection tells), and gRPC goes HTTP/2
    unless the endpoint is known to have chosen http/1.1 (``ProtocolUnavailable``).
    Without TLS, gRPC and ``protocol = "h2"`` get HTTP/2 with prior knowledge and
    everything else HTTP/1.1. Raises ``UpstreamError`` as a connect failure would."""
    if ep.meshed and ep.inbound_port:  # mTLS when both sides have an identity
        return "meshed", (ep.host, ep.inbound_port), mesh_target(worker, ep, call.row)
    svc = call.svc
    if svc is None:
        return ("h2" if grpc else "http1"), ep.address, None
    tls = worker.tls.target(call.service) if svc.tls is not None else None
    if svc.protocol == "h2":
        return "h2", ep.address, tls
    if tls is not None:
        chosen = worker.tls.alpn.get(ep.address)
        if chosen == "h2":
            return "h2", ep.address, tls
        if grpc:
            if chosen is not None:
                raise ProtocolUnavailable(f"gRPC needs HTTP/2, and {ep} selected ALPN "
                                          f"{chosen} over TLS")
            return "h2", ep.address, tls
        return "http1", ep.address, tls
    return ("h2" if grpc else "http1"), ep.address, None


def is_grpc(headers: Headers) -> bool:
    for k, v in headers:
        if k.lower() == b"content-type":
            return v.lower().startswith(b"application/grpc")
    return False


def strip_port(host: str) -> str:
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
