"""What production does to upstream connections, on real meshd processes: idle pooled
connections closed by time and when the upstream closes them; a peer meshd whose worker
stops (SIGSTOP) costs no request more than the PING timeout; a peer meshd reloading
under POST load refuses streams, which are sent again, and no POST reaches the
application twice; a POST whose response was lost fails naming why."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time

import pytest
from conftest import MeshFactory

from meshd.shm import STATE_SERVING
from meshd.testing.harness import Meshd, free_port, tcp_sockets, wait_for
from meshd.testing.tcp_server import TcpServer

INBOUND = """
[[listener]]
name = "inbound"
listen = "127.0.0.1:{port}"
direction = "inbound"
protocol = "auto"
forward = "{app}"
"""

CLOSE_WAIT = "08"


def _sockets_to(pid: int, port: int) -> list[str]:
    """The states of the TCP sockets process ``pid`` holds to 127.0.0.1:``port``."""
    return [state for _, remote, state in tcp_sockets(pid) if remote == port]


def _two_meshds(mesh: MeshFactory, app: str, *, workers_b: int = 1, extra_a: str = "",
                ) -> tuple[Meshd, Meshd, int]:
    """Outbound meshd A (one worker) -> inbound meshd B (``workers_b``) -> ``app``: A's
    discovery lists service web at ``app``, meshed behind B's inbound port. Returns A,
    B and B's inbound port."""
    inbound_port = free_port()
    text_b, ports_b = mesh.config({}, workers=workers_b,
                                  listeners=INBOUND.format(port=inbound_port, app=app))
    b = mesh.start(text_b, ports_b)
    meshed = f'{{ address = "{app}", meshed = true, inbound_port = {inbound_port} }}'
    text_a, ports_a = mesh.config({}, workers=1, extra=extra_a)
    text_a = text_a.replace("[discovery.services]\n",
                            f"[discovery.services]\nweb = [{meshed}]\n")
    return mesh.start(text_a, ports_a), b, inbound_port


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """One pair for the tests between two meshds (each meshd costs seconds to start):
    A (idle_timeout 1s) -> B (two workers) -> the application. Returns (A, B, B's
    inbound port, the application)."""
    import shutil

    from meshd.testing.harness import Backend

    factory = MeshFactory(tmp_path_factory.mktemp("pair"))
    app = Backend("app").start()
    try:
        a, b, inbound_port = _two_meshds(factory, app.address, workers_b=2,
                                         extra_a='[service.web]\nidle_timeout = "1s"\n')
        yield a, b, inbound_port, app
    finally:
        for m in factory.started:
            m.stop()
        app.stop()
        shutil.rmtree(factory.run_dir, ignore_errors=True)


def _get(port: int, path: str, timeout: float = 15.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": "web"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# -- idle upstream connections ------------------------------------------------------------

def test_idle_http1_connections_are_closed_by_time(mesh, backends):
    """Several pooled connections to an endpoint, then no traffic: all closed once idle
    past the service's idle_timeout (plus a reaper tick), not when next handed out."""
    app = backends("app")
    m = mesh.run({"web": [app.address]}, workers=1,
                 extra='[service.web]\nidle_timeout = "1s"\n')
    (worker,) = m.worker_pids()
    threads = [threading.Thread(target=_get, args=(m.ports["outbound"], "/slow?ms=200"))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert len(_sockets_to(worker, app.port)) >= 2  # pooled, concurrently made
    stopped = time.monotonic()
    wait_for(lambda: not _sockets_to(worker, app.port), timeout=10,
             what="the idle connections closed")
    assert time.monotonic() - stopped < 1 + 0.5 + 2  # idle_timeout + a tick (+ slack)
    # Counted on the (listener, service) row of their last request.
    m.wait_metric("meshd_upstream_idle_closed_total",
                  'direction="outbound",listener="outbound",service="web"', at_least=2)


def test_upstream_closing_an_idle_connection_leaves_no_close_wait(mesh):
    """An upstream that closes keep-alive connections after 100 ms idle (as servers
    with a short keep-alive timeout do): meshd notices while the connection idles in
    its pool (default idle_timeout 60 s) and closes its side: no CLOSE_WAIT."""
    answered = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            answered.set()
            time.sleep(0.1)  # keep-alive timeout: then close (FIN)

    with TcpServer(serve) as srv:
        m = mesh.run({"web": [srv.address]}, workers=1)
        (worker,) = m.worker_pids()
        assert _get(m.ports["outbound"], "/") == (200, b"ok")
        assert answered.wait(5)
        # the server's FIN arrived: meshd's side went to CLOSE_WAIT or was closed at once
        try:
            wait_for(lambda: not _sockets_to(worker, srv.port), timeout=5,
                     what="no socket to the upstream")
        except TimeoutError:
            raise AssertionError(f"left: {_sockets_to(worker, srv.port)}") from None


def test_idle_h2_connection_to_a_peer_meshd_is_closed(pair):
    """The multiplexed HTTP/2 connection between two meshds closes once idle for the
    service's idle_timeout (it was 300 s whatever the service said)."""
    a, _, inbound_port, _ = pair
    (worker_a,) = a.worker_pids()
    assert _get(a.ports["outbound"], "/")[0] == 200
    assert _sockets_to(worker_a, inbound_port) == ["01"]
    wait_for(lambda: not _sockets_to(worker_a, inbound_port), timeout=10,
             what="the idle HTTP/2 connection closed")
    a.wait_metric("meshd_upstream_idle_closed_total", 'listener="outbound",service="web"')


# -- a silent peer ------------------------------------------------------------------------

def _worker_holding(b: Meshd, port: int) -> int:
    """The pid of B's worker that holds an established connection on its ``port``."""
    holders = [pid for pid in b.worker_pids()
               if any(local == port and state == "01" for local, _, state in tcp_sockets(pid))]
    assert len(holders) == 1, holders
    return holders[0]


def test_stopped_inbound_worker_costs_no_get_over_two_seconds(pair):
    """B's worker holding A's HTTP/2 connection is SIGSTOPped: A's PING on it goes
    unanswered, the connection is taken out of use, the waiting GETs go again on a new
    connection (B's other worker takes it). No GET takes 2 s (it was B's worker_timeout:
    6 s and more); each answered 200."""
    a, b, inbound_port, _ = pair
    port = a.ports["outbound"]
    for _ in range(3):
        assert _get(port, "/")[0] == 200
    stopped = _worker_holding(b, inbound_port)
    results: list[tuple[int, float]] = []
    errors: list[str] = []

    def client(i: int) -> None:
        deadline = time.monotonic() + 3.0
        n = 0
        while time.monotonic() < deadline and n < 200:
            n += 1
            started = time.monotonic()
            try:
                status, _ = _get(port, f"/c{i}/{n}")
            except OSError as e:
                errors.append(repr(e))
                continue
            results.append((status, time.monotonic() - started))

    os.kill(stopped, signal.SIGSTOP)
    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        try:
            os.kill(stopped, signal.SIGCONT)
        except ProcessLookupError:  # its master killed it (worker_timeout): the old code
            pass
    assert errors == []
    assert results and all(status == 200 for status, _ in results), results
    worst = max(seconds for _, seconds in results)
    assert worst < 2.0, f"worst GET took {worst:.2f}s ({len(results)} GETs)"
    assert "answered no PING" in a.log()
    a.wait_metric("meshd_upstream_ping_timeouts_total", 'listener="outbound",service="web"')


# -- a peer reloading under POST load -----------------------------------------------------

def _serving(m: Meshd) -> set[int]:
    return set(m.worker_pids(STATE_SERVING))


def test_peer_reload_under_post_load_fails_no_post_and_delivers_none_twice(pair):
    """POSTs through A while B reloads (HUP) twice: the streams B refuses (beyond
    its GOAWAY's last stream id, or REFUSED_STREAM) are sent again whatever the method,
    and no POST reaches the application twice (each has its own path, counted there)."""
    a, b, _, app = pair
    port = a.ports["outbound"]
    done = threading.Event()
    failures: list[str] = []
    sent: list[str] = []

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        n = 0
        try:
            while not done.is_set() and n < 2000:
                n += 1
                path = f"/post/{i}/{n}"
                sent.append(path)
                try:
                    conn.request("POST", path, body=b"x" * 100, headers={"Host": "web"})
                    resp = conn.getresponse()
                    body = resp.read()
                except (OSError, http.client.HTTPException) as e:
                    failures.append(f"{path}: {e!r}")
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
                    continue
                if resp.status != 200:
                    failures.append(f"{path}: {resp.status} {resp.getheader('meshd-error')} "
                                    f"{body[:100]!r}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        for _ in range(2):
            wait_for(lambda: len(sent) > 100, timeout=10, what="POSTs under way")
            before = _serving(b)
            sent_before = len(sent)
            b.signal(signal.SIGHUP)
            wait_for(lambda: len(_serving(b)) == 2 and not _serving(b) & before,  # noqa: B023
                     timeout=20, what="B's new workers serving")
            wait_for(lambda: len(sent) > sent_before + 50, timeout=10,  # noqa: B023
                     what="POSTs after the reload")
    finally:
        done.set()
        for t in threads:
            t.join(30)
    assert failures == [], failures[:5]
    status, counts = _get(app.port, "/_counts")
    assert status == 200
    delivered = {k: v for k, v in json.loads(counts).items() if k.startswith("POST /post/")}
    twice = {k: v for k, v in delivered.items() if v > 1}
    assert twice == {}
    assert len(delivered) == len(sent)


def test_refused_streams_sent_again_are_counted(pair):
    """GETs through A while B reloads: the streams B refuses around its GOAWAY and sent
    again are counted per service (meshd_upstream_refused_retries_total). A refusal
    needs a stream in flight as the GOAWAY crosses it: B reloads until one was (at
    most 8 times)."""
    a, b, _, _ = pair
    port = a.ports["outbound"]
    done = threading.Event()
    failures: list[str] = []
    sent = [0]
    labels = 'listener="outbound",service="web"'

    def client() -> None:
        while not done.is_set() and sent[0] < 100_000:
            sent[0] += 1
            try:
                status, _ = _get(port, "/")
            except OSError as e:
                failures.append(repr(e))
                continue
            if status != 200:
                failures.append(str(status))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        for _ in range(8):
            before = _serving(b)
            count = sent[0]
            b.signal(signal.SIGHUP)
            wait_for(lambda: len(_serving(b)) == 2 and not _serving(b) & before,  # noqa: B023
                     timeout=20, what="B's new workers serving")
            wait_for(lambda: sent[0] > count + 50, timeout=10, what="GETs after the reload")  # noqa: B023
            if a.metric("meshd_upstream_refused_retries_total", labels) > 0:
                break
    finally:
        done.set()
        for t in threads:
            t.join(30)
    assert failures == [], failures[:5]
    assert a.metric("meshd_upstream_refused_retries_total", labels) > 0


# -- write failures: before anything was sent, or with the response lost ------------------

def _reset_pair(read_first: bool) -> tuple[object, threading.Thread]:
    """A gevent client socket connected to a loopback peer that resets the connection
    (RST: SO_LINGER 0): at once (``read_first`` False), or after reading a whole
    request head and body ("/x", 4 bytes). Returns the client socket and the peer's
    thread."""
    import gevent.socket

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def peer() -> None:
        conn, _ = listener.accept()
        listener.close()
        if read_first:
            data = b""
            while not data.endswith(b"body"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()

    plain = socket.create_connection(("127.0.0.1", port), timeout=5)  # done in the backlog
    t = threading.Thread(target=peer, daemon=True)
    t.start()
    sock = gevent.socket.socket(fileno=plain.detach())
    sock.settimeout(None)
    return sock, t


def _post_through_exchange(sock: object) -> BaseException:
    """A POST with a body over ``sock`` through an Http1Exchange, as the attempt loop
    drives it: the error its response wait raises."""
    from meshd.discovery.api import Endpoint
    from meshd.errors import UpstreamError
    from meshd.worker.upstream.exchange import Http1Exchange, UpstreamExchange
    from meshd.worker.upstream.http1 import Pool, UpstreamConn

    def sender(ex: UpstreamExchange) -> bool:
        try:
            ex.send_body([b"body"], end=True)
        except UpstreamError:
            return False
        return True

    conn = UpstreamConn(sock, Endpoint("127.0.0.1", 1))  # type: ignore[arg-type]
    head = b"POST /x HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\n\r\n"
    ex = Http1Exchange(Pool(), conn, head, b"POST", sender, 1.0, 65536, 100, length=4)
    ex.start()
    deadline = time.monotonic() + 5
    try:
        ex.response(deadline, deadline)
    except UpstreamError as e:
        return e
    finally:
        ex.abort()
    raise AssertionError("the exchange got a response from a peer that reset")


def test_a_write_that_fails_before_any_byte_went_is_not_sent():
    """The connection was reset before the request's first write: NotSent (the attempt
    loop sends it again whatever the method), naming the cause."""
    import gevent

    from meshd.errors import NotSent

    sock, peer = _reset_pair(read_first=False)
    peer.join(5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the RST has arrived: the socket reads as ready
        import select
        if select.select([sock], [], [], 0)[0]:
            break
        gevent.sleep(0.01)
    err = _post_through_exchange(sock)
    assert isinstance(err, NotSent), repr(err)
    assert "write failed before sending" in str(err)


def test_a_request_that_went_and_lost_its_response_is_not_unsent():
    """The peer read the whole request, then reset: the request may have been
    processed, so the failure is a lost response (an UpstreamError, not NotSent)."""
    from meshd.errors import NotSent

    sock, peer = _reset_pair(read_first=True)
    err = _post_through_exchange(sock)
    peer.join(5)
    assert not isinstance(err, NotSent), repr(err)


def test_a_post_whose_response_was_lost_fails_naming_why_and_is_sent_once(mesh):
    """An upstream reads a whole POST, then closes without answering: meshd answers 502
    saying the response was lost and that a POST is not retried; the upstream got it
    once. (A GET in the same case is sent again: answered by the second connection.)"""
    requests: list[bytes] = []

    def serve(conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data or (data.startswith(b"POST") and
                                               not data.endswith(b"body")):
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            requests.append(data.split(b" ", 1)[0])
            if data.startswith(b"GET") and requests.count(b"GET") > 1:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                time.sleep(0.2)

    with TcpServer(serve) as srv:
        m = mesh.run({"web": [srv.address]}, workers=1)
        conn = http.client.HTTPConnection("127.0.0.1", m.ports["outbound"], timeout=15)
        conn.request("POST", "/x", body=b"body", headers={"Host": "web"})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        assert resp.status == 502
        reason = resp.getheader("meshd-error") or ""
        assert reason.startswith("response lost, POST not retried (it may have been "
                                 "processed): "), reason
        assert requests == [b"POST"]
        assert _get(m.ports["outbound"], "/")[0] == 200
        assert requests == [b"POST", b"GET", b"GET"]
