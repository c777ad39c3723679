"""HTTP/1.1 reverse proxying of one client connection (runs in its own greenlet).

For each request on a keep-alive connection: read and parse the head (bounded size,
deadline), route it (outbound: Host -> service -> endpoint; inbound: the listener's
``forward`` address), send it upstream over a pooled connection with hop-by-hop headers
removed and our own framing, stream the body both ways without holding it whole (a
separate greenlet sends the request body so an upstream that answers while it reads
never deadlocks us), and count the outcome in this worker's shared-memory stripe.
Errors before the response head answers the client with the error's status and a
one-line reason; after it, the connection is closed.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING

import gevent
from gevent import Timeout

from meshd.discovery.api import Endpoint
from meshd.errors import (
    BadRequest,
    HeadersTooLarge,
    NoService,
    ProxyError,
    RequestTimeout,
    UpstreamError,
    UpstreamTimeout,
    UriTooLong,
)
from meshd.proto import http1
from meshd.shm import F_REQUESTS, ROW_OVERFLOW, ROW_UNKNOWN
from meshd.worker.retries import replayable
from meshd.worker.sockio import sendall
from meshd.worker.upstream import UpstreamConn

if TYPE_CHECKING:
    from meshd.config import ListenerConfig, ServiceConfig
    from meshd.worker.process import Worker

log = logging.getLogger("meshd.worker")

READ_SIZE = 262144
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
DEFAULT_TIMEOUT = 10.0
BODY_IDLE_TIMEOUT = 60.0


class ClientGone(Exception):
    """The client closed or reset its connection: nothing to answer."""


class _RetryNow(Exception):
    """This attempt failed in a way another endpoint may not: send the request again."""


class Idle(Exception):
    """A keep-alive connection ended between requests (EOF, idle timeout or drain)."""


class HttpConnection:
    def __init__(self, worker: Worker, listener: ListenerConfig, sock: socket.socket) -> None:
        self.worker = worker
        self.listener = listener
        self.sock = sock
        self.buf = bytearray()
        self.limits = worker.config.limits
        self.idle_since = 0.0          # > 0 while waiting for the next request

    # -- the request loop ---------------------------------------------------------------

    def serve(self) -> None:
        first = True
        while True:
            try:
                head = self._read_head(first)
            except Idle:
                return
            except ProxyError as e:
                self._answer_error(e, close=True)
                return
            first = False
            started = time.monotonic()
            try:
                req = http1.parse_request_head(head, max_request_line=self.limits.request_line_bytes,
                                               max_headers=self.limits.header_count)
                absolute = http1.split_absolute_form(req.target)
                if absolute is not None:  # the target's authority wins over Host
                    req.host, req.target = absolute
                    req.headers = [(k, v) for k, v in req.headers if k.lower() != b"host"]
                    req.headers.append((b"Host", absolute[0]))
            except ProxyError as e:
                self._answer_error(e, close=True)
                return
            try:
                keep = self._proxy(req, started)
            except ClientGone:
                return
            if not keep:
                return
            # Draining: a response that already went out with keep-alive promised the
            # client one more request; it gets answered (with Connection: close), or the
            # connection is closed once it has been idle for a grace period.

    def _read_head(self, first: bool) -> bytes:
        """The next request head. Raises Idle when the client leaves between requests."""
        buf = self.buf
        sock = self.sock
        limit = self.limits.header_bytes
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            return self._take_head(end)
        self.idle_since = time.monotonic()
        timeout = self.limits.client_idle_timeout if not buf else self.limits.header_read_timeout
        deadline = time.monotonic() + timeout
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if buf:
                        raise RequestTimeout("request header read timed out")
                    raise Idle()
                sock.settimeout(remaining)
                try:
                    data = sock.recv(READ_SIZE)
                except TimeoutError:
                    continue
                except OSError:
                    raise Idle() from None
                if not data:
                    if buf and not first:
                        raise BadRequest("connection closed inside a request head")
                    raise Idle()
                if not buf:
                    # The head's own deadline starts with its first byte.
                    self.idle_since = 0.0
                    deadline = time.monotonic() + self.limits.header_read_timeout
                start = max(0, len(buf) - 3)
                buf += data
                line_limit = self.limits.request_line_bytes
                if len(buf) > line_limit + 4 and buf.find(b"\n", 0, line_limit + 4) < 0:
                    raise UriTooLong(f"request line longer than {line_limit} bytes")
                end = buf.find(b"\r\n\r\n", start)
                if end >= 0:
                    if end + 4 > limit:
                        raise HeadersTooLarge()
                    return self._take_head(end)
                if len(buf) > limit:
                    raise HeadersTooLarge()
        finally:
            self.idle_since = 0.0
            sock.settimeout(None)

    def _take_head(self, end: int) -> bytes:
        head = bytes(self.buf[: end + 4])
        del self.buf[: end + 4]
        return head

    # -- one request --------------------------------------------------------------------

    def _proxy(self, req: http1.RequestHead, started: float) -> bool:
        """Proxy one request. Returns whether the client connection stays open."""
        worker = self.worker
        stripe = worker.stripe
        service, endpoints, row = self._route(req)
        stripe.add(row, F_REQUESTS)
        self.response_started = False
        self._body_error = None
        status = 502
        try:
            if endpoints is None:
                raise NoService(f"unknown service {service!r}: no discovery source knows it")
            svc = worker.config.services.get(service) if service else None
            deadline = started + (svc.timeout if svc else DEFAULT_TIMEOUT)
            connect_timeout = svc.connect_timeout if svc else 2.0
            if req.expect_continue and req.has_body:
                self._send(CONTINUE)
            retries = (svc.retries if svc else 1) if replayable(req.method, req.has_body) else 0
            tried: list[int] = []
            attempt = 0
            while True:
                try:
                    status, keep = self._exchange(req, service, svc, endpoints, deadline,
                                                  connect_timeout, tried, row, attempt < retries)
                    return keep
                except _RetryNow:
                    attempt += 1
                    gevent.sleep(worker.retries.backoff(attempt))
        except ProxyError as e:
            status = e.status
            if self.response_started:  # mid-body: the client learns from the closed connection
                log.warning("%s: %s after the response started; closing", self.listener.name, e.reason)
                return False
            return self._answer_error(e, close=not self._request_finished)
        finally:
            stripe.record_response(row, status, time.monotonic() - started, status >= 500)

    def _route(self, req: http1.RequestHead) -> tuple[str, tuple[Endpoint, ...] | None, int]:
        snap = self.worker.snapshot
        lst = self.listener
        if lst.direction == "inbound":
            assert lst.forward is not None
            service = str(lst.forward)
            endpoints: tuple[Endpoint, ...] | None = (Endpoint(lst.forward.host, lst.forward.port),)
        else:
            if lst.service:
                service = lst.service
            else:
                host = (req.host or b"").decode("latin-1")
                service = _strip_port(host)
            endpoints = self.worker.resolve(service)
            snap = self.worker.snapshot
        if endpoints is None:
            return service, None, ROW_UNKNOWN
        row = snap.row(lst.name, service)
        return service, endpoints, ROW_OVERFLOW if row is None else row

    def _may_retry(self, retry_ok: bool, row: int, deadline: float) -> bool:
        """This attempt failed before any response byte reached the client: may the
        request go to another endpoint? (Spends the shared budget when it may.)"""
        now = time.monotonic()
        if not retry_ok or now >= deadline:
            return False
        return self.worker.retries.try_retry(row, self.worker.balancer.live_slots(now), now)

    def _exchange(self, req: http1.RequestHead, service: str, svc: ServiceConfig | None,
                  endpoints: tuple[Endpoint, ...],
                  deadline: float, connect_timeout: float, tried: list[int], row: int,
                  retry_ok: bool) -> tuple[int, bool]:
        worker = self.worker
        self._request_finished = not req.has_body
        headers = http1.strip_hop_by_hop(req.headers, req.connection_tokens)
        if req.expect_continue:
            headers = [(k, v) for k, v in headers if k.lower() != b"expect"]
        framing: list[tuple[bytes, bytes]] = []
        if req.chunked:
            framing.append((b"Transfer-Encoding", b"chunked"))
        elif req.content_length is not None:
            framing.append((b"Content-Length", b"%d" % req.content_length))
        head = http1.serialize_request_head(req.method, req.target, headers, framing)
        snap = worker.snapshot
        balancer = worker.balancer
        for _ in range(4):  # a retry goes to an endpoint not tried yet, when there is one
            index, ep_row = balancer.pick(service, endpoints, snap.endpoint_rows,
                                          svc.balancer if svc else "p2c", snap.splits.get(service),
                                          svc.failure_accrual if svc else 7)
            if index not in tried or len(tried) >= len(endpoints):
                break
        tried.append(index)
        ep = endpoints[index]
        balancer.started(ep_row)
        sent_at = time.monotonic()
        rtt: float | None = None
        failed = True
        sender = None
        try:
            conn = worker.pool.acquire(ep, min(connect_timeout, max(deadline - sent_at, 0.001)),
                                       check=req.has_body)
        except BaseException as e:
            balancer.finished(ep_row, None, True)
            if isinstance(e, ProxyError) and self._may_retry(retry_ok, row, deadline):
                raise _RetryNow() from None
            raise
        try:
            if req.has_body:
                sender = gevent.spawn(self._send_body, req, head, conn)
                resp = self._read_response_head(conn, req, deadline, sender)
            else:
                try:
                    try:
                        sendall(conn.sock, head)
                    except OSError as e:
                        raise UpstreamError(f"sending to {conn.endpoint}: {e.strerror or e}") from None
                    resp = self._read_response_head(conn, req, deadline, None)
                except UpstreamError:
                    if not conn.reused:
                        raise
                    # A pooled connection the upstream closed as we reused it: the request
                    # had no body and got no answer, so sending it again is safe.
                    conn.close()
                    conn = worker.pool.connect(ep, connect_timeout)
                    sendall(conn.sock, head)
                    resp = self._read_response_head(conn, req, deadline, None)
            rtt = time.monotonic() - sent_at
            failed = resp.status >= 500
            if failed and sender is None and self._may_retry(retry_ok, row, deadline):
                conn.close()  # its body is unread: the connection cannot be reused
                raise _RetryNow()
            keep = self._relay_response(req, resp, conn)
            if sender is not None:
                sender.join()
                if not sender.successful() or sender.value is not True:
                    keep = False
                    conn.reused = False
                    conn.close()
                    return resp.status, keep
            if resp.keep_alive and self._upstream_clean:
                worker.pool.release(conn)
            else:
                conn.close()
            return resp.status, keep
        except BaseException as e:
            if sender is not None:
                sender.kill(block=False)
            conn.close()
            if isinstance(e, _RetryNow):
                raise
            if (isinstance(e, (OSError, ProxyError)) and not self.response_started
                    and self._body_error is None and self._may_retry(retry_ok, row, deadline)):
                raise _RetryNow() from None
            if isinstance(e, OSError) and not self.response_started:
                raise UpstreamError(f"connection to {conn.endpoint} failed: {e.strerror or e}") from None
            body_error = self._body_error
            if isinstance(e, ProxyError) and body_error is not None and not self.response_started:
                if isinstance(body_error, ProxyError):
                    raise body_error from None
                raise ClientGone() from None
            raise
        finally:
            balancer.finished(ep_row, rtt, failed)

    def _send_body(self, req: http1.RequestHead, head: bytes, conn: UpstreamConn) -> bool:
        """Stream the request body upstream. True when all of it was sent."""
        up = conn.sock
        try:
            if req.chunked:
                decoder = http1.ChunkedDecoder()
                out = [head]
                pieces = decoder.feed(bytes(self.buf))
                self.buf.clear()
                while True:
                    out.extend(http1.encode_chunk(p) for p in pieces if p)
                    if decoder.done:
                        kept = http1.forwardable_trailers(decoder.trailers)
                        out.append(http1.encode_trailers(kept) if kept else http1.LAST_CHUNK)
                        sendall(up, b"".join(out))
                        self.buf += decoder.unconsumed
                        break
                    if out:
                        sendall(up, b"".join(out))
                        out = []
                    pieces = decoder.feed(self._recv_body())
            else:
                remaining = req.content_length or 0
                take = min(len(self.buf), remaining)
                first = head + bytes(self.buf[:take])
                del self.buf[:take]
                remaining -= take
                sendall(up, first)
                while remaining > 0:
                    data = self._recv_body(min(remaining, READ_SIZE))
                    remaining -= len(data)
                    sendall(up, data)
        except (ClientGone, ProxyError, OSError) as e:
            # Stop the response wait too: the upstream will never see the whole request.
            self._body_error = e
            try:
                up.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return False
        self._request_finished = True
        return True

    def _recv_body(self, size: int = READ_SIZE) -> bytes:
        try:
            with Timeout(BODY_IDLE_TIMEOUT, RequestTimeout("request body read timed out")):
                data = self.sock.recv(size)
        except OSError:
            raise ClientGone() from None
        if not data:
            raise ClientGone()
        return data

    def _read_response_head(self, conn: UpstreamConn, req: http1.RequestHead, deadline: float,
                            sender: gevent.Greenlet | None) -> http1.ResponseHead:
        buf = conn.buf
        limit = self.limits.header_bytes
        while True:
            end = buf.find(b"\r\n\r\n")
            while end < 0:
                if len(buf) > limit:
                    raise UpstreamError("response head from upstream too large")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise UpstreamTimeout(f"no response from {conn.endpoint} within the timeout")
                conn.sock.settimeout(remaining)
                try:
                    data = conn.sock.recv(READ_SIZE)
                except TimeoutError:
                    continue
                except OSError as e:
                    raise UpstreamError(f"connection to {conn.endpoint} failed: {e.strerror or e}") from None
                finally:
                    conn.sock.settimeout(None)
                if not data:
                    raise UpstreamError(f"{conn.endpoint} closed the connection before responding")
                start = max(0, len(buf) - 3)
                buf += data
                end = buf.find(b"\r\n\r\n", start)
            head = bytes(buf[: end + 4])
            del buf[: end + 4]
            resp = http1.parse_response_head(head, max_headers=self.limits.header_count)
            if resp.status == 100 or not 100 <= resp.status < 200 or resp.status == 101:
                if resp.status != 100:
                    return resp
                continue  # our own 100 Continue already went to the client, if it asked
            self._send(http1.serialize_response_head(resp.status, resp.reason, resp.headers))

    def _relay_response(self, req: http1.RequestHead, resp: http1.ResponseHead,
                        conn: UpstreamConn) -> bool:
        """Send the response to the client. Returns whether the client connection stays."""
        keep = req.keep_alive and not self.worker.draining
        headers = http1.strip_hop_by_hop(resp.headers, resp.connection_tokens)
        extra: list[tuple[bytes, bytes]] = []
        has_body = http1.response_has_body(req.method, resp.status)
        close_delimited = has_body and not resp.chunked and resp.content_length is None
        chunk_out = resp.chunked or (close_delimited and req.version == b"HTTP/1.1")
        if close_delimited and not chunk_out:
            keep = False
        if not has_body:
            if resp.content_length is not None and resp.status != 204:
                extra.append((b"Content-Length", b"%d" % resp.content_length))
        elif chunk_out:
            extra.append((b"Transfer-Encoding", b"chunked"))
        elif resp.content_length is not None:
            extra.append((b"Content-Length", b"%d" % resp.content_length))
        if not keep:
            extra.append((b"Connection", b"close"))
        elif req.version == b"HTTP/1.0":
            extra.append((b"Connection", b"keep-alive"))
        head = http1.serialize_response_head(resp.status, resp.reason, headers, extra)
        self._upstream_clean = not close_delimited
        self.response_started = True
        if not has_body:
            self._send(head)
        elif resp.chunked:
            self._relay_chunked(head, conn)
        elif resp.content_length is not None:
            self._relay_exact(head, conn, resp.content_length)
        else:
            self._relay_until_close(head, conn, chunk_out)
        return keep

    def _upstream_recv(self, conn: UpstreamConn) -> bytes:
        if conn.buf:
            data = bytes(conn.buf)
            conn.buf.clear()
            return data
        try:
            with Timeout(BODY_IDLE_TIMEOUT, UpstreamTimeout("response body stalled")):
                return conn.sock.recv(READ_SIZE)
        except OSError as e:
            raise UpstreamError(f"reading from {conn.endpoint}: {e.strerror or e}") from None

    def _upstream_body(self, conn: UpstreamConn) -> bytes:
        data = self._upstream_recv(conn)
        if not data:
            raise UpstreamError(f"{conn.endpoint} closed the connection inside the response body")
        return data

    def _relay_exact(self, head: bytes, conn: UpstreamConn, n: int) -> None:
        take = min(len(conn.buf), n)
        first = head + bytes(conn.buf[:take])
        del conn.buf[:take]
        n -= take
        self._send(first)
        while n > 0:
            data = self._upstream_body(conn)
            if len(data) > n:
                conn.buf += data[n:]
                data = data[:n]
            n -= len(data)
            self._send(data)

    def _relay_chunked(self, head: bytes, conn: UpstreamConn) -> None:
        decoder = http1.ChunkedDecoder()
        out = [head]
        while True:
            try:
                pieces = decoder.feed(self._upstream_body(conn))
            except BadRequest as e:
                raise UpstreamError(f"bad chunked body from upstream: {e.reason}") from None
            out.extend(http1.encode_chunk(p) for p in pieces if p)
            if decoder.done:
                kept = http1.forwardable_trailers(decoder.trailers)
                out.append(http1.encode_trailers(kept) if kept else http1.LAST_CHUNK)
                self._send(b"".join(out))
                conn.buf += decoder.unconsumed
                return
            if out:
                self._send(b"".join(out))
                out = []

    def _relay_until_close(self, head: bytes, conn: UpstreamConn, chunk_out: bool) -> None:
        self._send(head)
        while True:
            data = self._upstream_recv(conn)
            if not data:
                if chunk_out:
                    self._send(http1.LAST_CHUNK)
                return
            self._send(http1.encode_chunk(data) if chunk_out else data)

    # -- to the client ------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        try:
            sendall(self.sock, data)
        except OSError:
            raise ClientGone() from None

    def _answer_error(self, err: ProxyError, close: bool) -> bool:
        """Answer with the error's status and reason. Returns whether to keep the connection."""
        level = logging.INFO if err.status < 500 else logging.WARNING
        log.log(level, "%s %s: %s", self.listener.name, err.status, err.reason)
        body = err.reason.encode("utf-8", "replace") + b"\n"
        close = close or self.worker.draining
        extra = [
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Content-Length", b"%d" % len(body)),
            (b"meshd-error", err.reason.encode("ascii", "replace")[:200]),
        ]
        if close:
            extra.append((b"Connection", b"close"))
        try:
            self._send(http1.serialize_response_head(err.status, b"", [], extra) + body)
        except ClientGone:
            return False
        return not close

    _request_finished = True
    _upstream_clean = True
    _body_error: BaseException | None = None
    response_started = False


def _strip_port(host: str) -> str:
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
