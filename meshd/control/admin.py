"""The admin HTTP API (WSGI, served by gevent.pywsgi in the control process), and the
bounds of its server.

``/live``, ``/ready``, ``/metrics`` (Prometheus text summed over workers), ``/stats``
(JSON: what `meshd stat` prints), ``/endpoints`` (JSON: services and endpoints) and
``/identity`` (JSON: the published workload identity, with ``[identity]``) and
``/config`` (JSON: the effective config, secrets masked: ``config_view``).
``/status`` (JSON: workers, reloads, shm rows, discovery sync, balancer state, recent
errors: ``meshd.control.status``); ``/`` is the dashboard (``meshd.control.dashboard``).
The probe listener (``[admin] probe_listen``) serves only ``/live`` and ``/ready``.

The server (:class:`AdminServer`) holds at most MAX_CONNECTIONS connections. A connection
is *idle* while it waits for a request head (a new one, or a kept-alive one between
requests); a head must arrive whole within HEAD_TIMEOUT, or the connection is closed. At
the cap, a new connection takes the place of the oldest idle one, so idle or trickling
clients cannot keep a probe of ``/live`` out; only when every connection is busy with a
request is the new one closed at accept. ``meshd_admin_connections_closed_total{reason}``
counts both.

A control process told to stop (a reload retires its generation, or meshd stops) drains
its servers (:func:`drain`): it closes its listening sockets at once, so only the next
generation's control process accepts from then on (the sockets are the master's: what
the kernel queued goes to that one), and lets the connections it already accepted
finish. Every answer from then on says ``Connection: close``; a connection that received
no byte of a request within DRAIN_IDLE is closed, one with a request begun (a head
partly read, a handler running, an answer being written) gets until the drain's limit.
Exiting at once instead reset them: a probe, or `meshd check --live`, that connected as
a reload retired the process saw its request fail.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import gevent
from gevent.pywsgi import WSGIHandler, WSGIServer

from meshd.control import build_info
from meshd.control import decisions as debug_decisions
from meshd.control.config_view import effective
from meshd.control.counters import COUNTERS
from meshd.control.dashboard import PATHS as DASHBOARD_PATHS
from meshd.control.dashboard import Dashboard
from meshd.control.status import status
from meshd.metrics import render_endpoints, render_prometheus, row_keys, serving_workers
from meshd.shm import KIND_WORKER, OFF_DESIRED, STATE_SERVING

if TYPE_CHECKING:
    from meshd.control.process import Control

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
READY_NAMES = 10   # services /ready names when it waits for discovery (then "and N more")

MAX_CONNECTIONS = 64   # admin connections at once: probes, scrapers, a few humans
HEAD_TIMEOUT = 10.0    # seconds for a whole request head (and the wait for it)
CLOSE_REASONS = ("evicted", "refused", "head_timeout")
DRAIN_IDLE = 2.0       # seconds a stopping server waits for a request on a connection
DRAIN_POLL = 0.02      # seconds between a drain's looks at its connections


class _Conn:
    __slots__ = ("sock", "idle", "begun", "deadline")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.idle = True                        # waiting for a request head
        self.begun = False                      # a byte of a request came (or is handled)
        self.deadline: gevent.Greenlet | None = None


class AdminServer(WSGIServer):
    """pywsgi's server with a connection cap and a request-head deadline (see above)."""

    def __init__(self, listener: socket.socket, application: Any, **kwargs: Any) -> None:
        super().__init__(listener, application, handler_class=AdminHandler, **kwargs)
        self.conns: dict[socket.socket, _Conn] = {}     # insertion order: oldest first
        self.closed_by_reason = dict.fromkeys(CLOSE_REASONS, 0)
        # The main admin server's closes are also counted in the region (a new control
        # process continues them: meshd.control.counters); the probe server's are not shown.
        self.counted = True
        self.draining = False    # told to stop: not listening, every answer closes

    def do_handle(self, *args: Any) -> None:   # in the accept loop: (socket, address)
        sock = args[0]
        if len(self.conns) >= MAX_CONNECTIONS and not self._evict_idle():
            self._closed("refused")
            sock.close()
            return
        self.conns[sock] = _Conn(sock)
        super().do_handle(*args)

    def do_close(self, *args: Any) -> None:    # the connection's greenlet is done
        conn = self.conns.pop(args[0], None)
        if conn is not None and conn.deadline is not None:
            conn.deadline.kill(block=False)
        super().do_close(*args)

    def _evict_idle(self) -> bool:
        for sock, conn in self.conns.items():
            if conn.idle:
                del self.conns[sock]
                self._closed("evicted")
                if conn.deadline is not None:
                    conn.deadline.kill(block=False)
                _shut(conn)
                return True
        return False

    def head_started(self, sock: socket.socket) -> None:
        """The handler waits for a request head: idle, and on the clock."""
        conn = self.conns.get(sock)
        if conn is not None:
            conn.idle = True
            conn.begun = False
            conn.deadline = gevent.spawn_later(HEAD_TIMEOUT, self._head_timeout, conn)

    def head_begun(self, sock: socket.socket) -> None:
        """A byte of the next request head is here: a drain waits for its answer."""
        conn = self.conns.get(sock)
        if conn is not None:
            conn.begun = True

    def head_done(self, sock: socket.socket) -> None:
        conn = self.conns.get(sock)
        if conn is not None:
            conn.idle = False
            conn.begun = True
            if conn.deadline is not None:
                conn.deadline.kill(block=False)
                conn.deadline = None

    def _head_timeout(self, conn: _Conn) -> None:
        conn.deadline = None
        if conn.idle and self.conns.get(conn.sock) is conn:
            self._closed("head_timeout")
            _shut(conn)

    def prometheus(self) -> Iterator[str]:
        yield "# HELP meshd_admin_connections Open admin connections."
        yield "# TYPE meshd_admin_connections gauge"
        yield f"meshd_admin_connections {len(self.conns)}"
        yield ("# HELP meshd_admin_connections_closed_total Admin connections meshd closed: "
               "evicted (idle, at the cap), refused (at the cap, none idle), head_timeout.")
        yield "# TYPE meshd_admin_connections_closed_total counter"
        for reason in self.closed_by_reason:
            name = _closed_name(reason)
            yield f"{name} {COUNTERS.value(name)}"

    def _closed(self, reason: str) -> None:
        self.closed_by_reason[reason] += 1
        if self.counted:
            COUNTERS.add(_closed_name(reason))


def drain(servers: list[AdminServer], limit: float) -> int:
    """Stop ``servers`` as a stopping control process does (module docstring): close
    their listening sockets now, then wait until the connections they accepted are done,
    closing those with no request begun after DRAIN_IDLE and every one left after
    ``limit`` seconds. Returns how many connections it closed with a request begun
    (0: every request begun was answered)."""
    for server in servers:
        server.draining = True
        server.close()          # the listening socket: stop accepting at once
    start = time.monotonic()
    idle_shut = False
    while any(server.conns for server in servers):
        waited = time.monotonic() - start
        if waited >= limit:
            break
        if waited >= min(DRAIN_IDLE, limit) and not idle_shut:
            idle_shut = True    # nothing came on these: the client went to the next one
            for server in servers:
                for conn in list(server.conns.values()):
                    if not conn.begun:
                        _shut(conn)
        gevent.sleep(DRAIN_POLL)
    cut = 0
    for server in servers:
        for conn in list(server.conns.values()):
            cut += conn.begun
            _shut(conn)
    # The handlers see EOF or an error and close their sockets; bounded, though they
    # need no more than a turn of the loop.
    for _ in range(50):
        if not any(server.conns for server in servers):
            break
        gevent.sleep(DRAIN_POLL)
    return cut


def _closed_name(reason: str) -> str:
    return f'meshd_admin_connections_closed_total{{reason="{reason}"}}'


def _shut(conn: _Conn) -> None:
    """End the connection: its handler, blocked reading, sees EOF and closes it."""
    try:
        conn.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class AdminHandler(WSGIHandler):
    """Tells the server when it waits for a request head; a write to a connection the
    server shut is not an error worth a traceback."""

    server: AdminServer

    def handle(self) -> None:
        try:
            super().handle()
        except OSError:
            pass

    def read_requestline(self) -> str:
        self.server.head_started(self.socket)
        # Wait for the first byte of the head here: from then on a drain lets this
        # request finish (a head that never starts is closed after DRAIN_IDLE). The
        # bytes stay in the buffer for the line's read.
        self.rfile.peek(1)
        self.server.head_begun(self.socket)
        line: str = super().read_requestline()
        return line

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Any:
        if self.server.draining and not any(k.lower() == "connection" for k, _ in headers):
            # this process stops: the client's next request goes to the next generation
            headers = [*headers, ("Connection", "close")]
        return super().start_response(status, headers, exc_info)

    def get_environ(self) -> dict[str, Any]:
        env: dict[str, Any] = super().get_environ()
        env["meshd.socket"] = self.socket  # /tap watches it for the client leaving
        return env

    def read_request(self, raw_requestline: str) -> Any:
        try:
            return super().read_request(raw_requestline)
        finally:
            self.server.head_done(self.socket)


PROBE_PATHS = ("/live", "/ready")


class AdminApp:
    def __init__(self, control: Control, probe_only: bool = False) -> None:
        self.control = control
        self.routes: dict[str, Callable[[], tuple[str, str, bytes]]] = {
            "/live": self.live,
            "/ready": self.ready,
            "/metrics": self.metrics,
            "/stats": self.stats,
            "/endpoints": self.endpoints,
            "/identity": self.identity,
            "/config": self.config,
            "/status": self.status,
        }
        # the dashboard's page and files (meshd.control.dashboard)
        self.dashboard: Dashboard | None = None if probe_only else Dashboard()
        # Routes that read the query string (client input: each one bounds and checks it).
        self.query_routes: dict[str, Callable[[str], tuple[str, str, bytes]]] = {
            "/debug/decisions": lambda qs: debug_decisions.handle(control, qs),
        }
        self.dropped_lines = debug_decisions.DroppedLines()
        if probe_only:  # reachable from the pod network: nothing that describes the mesh
            self.routes = {p: self.routes[p] for p in PROBE_PATHS}
            self.query_routes = {}
        # /tap streams (meshd.control.tap): not a route of one answer
        self.tap = None if probe_only else control.tap

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if self.dashboard is not None and path in DASHBOARD_PATHS:
            return self.dashboard(environ, start_response)
        if self.tap is not None and path == "/tap":
            return self.tap(environ, start_response)
        route = self.routes.get(path)
        with_query = self.query_routes.get(path)
        if with_query is not None:
            qs = environ.get("QUERY_STRING", "")
            route = lambda: with_query(qs)  # noqa: E731
        if route is None:
            status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
        elif environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
        else:
            status, ctype, body = route()
        start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
        return [body]

    def live(self) -> tuple[str, str, bytes]:
        alive = os.getppid() == self.control.ctx.master_pid
        return ("200 OK" if alive else "503 Service Unavailable"), "text/plain", (
            b"live\n" if alive else b"master gone\n")

    def ready(self) -> tuple[str, str, bytes]:
        """200 "ready", or 503 naming what it waits for: workers not serving yet, each
        service whose first answer a source still owes (at most READY_NAMES of them), the
        first endpoints not yet handed to the workers."""
        c = self.control
        serving = serving_workers(c.region)
        desired = c.region.get_u32(OFF_DESIRED)
        published = c.discovery.first_published.is_set()
        pending = c.discovery.pending()
        # Every serving worker of this generation loaded a snapshot holding every first
        # answer (ready_seq) or a later one. Monotone: a worker's seq only grows and a new
        # worker loads the newest snapshot before it serves, so later publications (churn)
        # never turn /ready back to 503.
        target = c.discovery.ready_seq
        behind = [s.pid for s in c.region.slots_in_use()
                  if s.kind == KIND_WORKER and s.state == STATE_SERVING
                  and s.generation == c.ctx.generation
                  and (target is None or s.snapshot_seq < target)]
        if not pending and published and target is None:
            c.discovery.dirty.set()  # the last first answer came in after the last publish
        identity = c.identity
        no_identity = identity is not None and not identity.published.is_set()
        fleet = c.discovery.fleet
        fleet_pending = fleet.pending()
        if (serving >= desired and not pending and published and not behind and not no_identity
                and not fleet_pending):
            # Refused fleet entries are named, but meshd is ready: the last good applies.
            return "200 OK", "text/plain", "".join(
                line + "\n" for line in ["ready", *fleet.ready_detail()]).encode()
        waiting = []
        if identity is not None and no_identity:
            # Workers serve only once they loaded an identity: say why there is none.
            why = identity.error or getattr(identity.provider, "error", None) or "none yielded yet"
            waiting.append(f"identity: no material published by {identity.describe_provider()} "
                           f"({why})")
        if serving < desired:
            waiting.append(f"workers: {serving} of {desired} serving")
        if pending:
            names = ", ".join(f"{name} (source {', '.join(srcs)})"
                              for name, srcs in pending[:READY_NAMES])
            more = f" and {len(pending) - READY_NAMES} more" if len(pending) > READY_NAMES else ""
            waiting.append(f"discovery: first answer for {names}{more}")
        if fleet_pending:
            names = ", ".join(f"{name} (source {', '.join(srcs)})"
                              for name, srcs in fleet_pending[:READY_NAMES])
            more = (f" and {len(fleet_pending) - READY_NAMES} more"
                    if len(fleet_pending) > READY_NAMES else "")
            waiting.append(f"fleet: first answer for {names}{more}")
        if not published:
            waiting.append("endpoints: not yet published to the workers")
        elif target is None and not pending:
            waiting.append("endpoints: the first answers not yet published to the workers")
        elif behind and not pending:
            waiting.append(f"endpoints: {len(behind)} worker(s) not yet on snapshot {target}")
        return ("503 Service Unavailable", "text/plain",
                ("not ready, waiting for " + "; ".join(waiting) + "\n").encode())

    def metrics(self) -> tuple[str, str, bytes]:
        c = self.control
        keys = row_keys(c.config, c.discovery.rows.rows)
        lines = [*c.discovery.prometheus(), *c.discovery.fleet.prometheus(),
                 *(c.server.prometheus() if c.server else ()),
                 *(c.identity.prometheus() if c.identity else ()),
                 *(c.tap.prometheus() if c.tap else ())]
        lines += self.dropped_lines.prometheus(c)
        lines += render_endpoints(c.region, {name: w.merged() for name, w
                                             in sorted(c.discovery.watches.items())},
                                  c.discovery.endpoint_rows.rows)
        text = render_prometheus(c.region, keys, build_info.labels(),
                                 tracing=c.config.tracing is not None) + "\n".join(lines) + "\n"
        return "200 OK", "text/plain; version=0.0.4; charset=utf-8", text.encode()

    def stats(self) -> tuple[str, str, bytes]:
        c = self.control
        keys = row_keys(c.config, c.discovery.rows.rows)
        c.sample_stats()
        body = {"generation": c.ctx.generation, "rows": c.stat_window.figures(keys)}
        return "200 OK", "application/json", json.dumps(body, indent=1).encode() + b"\n"

    def identity(self) -> tuple[str, str, bytes]:
        runner = self.control.identity
        if runner is None:
            return "404 Not Found", "text/plain", b"no [identity] in the config\n"
        body = runner.describe()
        return "200 OK", "application/json", json.dumps(body, indent=1).encode() + b"\n"

    def config(self) -> tuple[str, str, bytes]:
        """The effective config of this generation, secrets masked (``config_view``)."""
        body = effective(self.control.config)
        body["fleet"] = self.control.discovery.fleet.describe()
        return "200 OK", "application/json", json.dumps(body, indent=1).encode() + b"\n"

    def status(self) -> tuple[str, str, bytes]:
        """This meshd at a glance for the dashboard and `meshd check --live`."""
        body = status(self.control)
        return "200 OK", "application/json", json.dumps(body, indent=1).encode() + b"\n"

    def endpoints(self) -> tuple[str, str, bytes]:
        body = self.control.discovery.describe()
        return "200 OK", "application/json", json.dumps(body, indent=1).encode() + b"\n"
