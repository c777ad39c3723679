"""The worker class (``meshd.worker.entry`` patches gevent, then runs ``main``): accept
loops on the shared listening sockets, one greenlet per connection (``meshd.worker.serve``), a heartbeat into shared memory, and the endpoint
snapshot reloaded when the control process rewrites it. With ``[identity]``, the workload
identity the control process publishes (``meshd.worker.identity``): a worker serves
only once it loaded both the first snapshot and an identity.

Stopping: TERM closes the listening sockets at once (the other generation's workers, or
nobody, take new connections), lets in-flight requests finish up to ``drain_timeout``,
answers further requests on kept-alive connections with ``Connection: close`` and closes
connections that stay idle for IDLE_CLOSE_GRACE. INT/QUIT exit at once.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import time
from typing import TYPE_CHECKING

import gevent
import gevent.event
import gevent.lock

from meshd import ratelog, rowkeys
from meshd.config import Config, ListenerConfig
from meshd.discovery.api import Endpoint
from meshd.identity import paths as identity_paths
from meshd.master.sockets import address_key
from meshd.ratelog import Throttle
from meshd.shm import (
    F_TCP_CLOSE_TOTAL,
    F_TCP_OPEN,
    F_TCP_OPEN_TOTAL,
    ROW_OVERFLOW,
    STATE_DRAINING,
    STATE_SERVING,
    Stripe,
)
from meshd.snapshot import Snapshot, control_socket_path
from meshd.snapshot import read as read_snapshot
from meshd.tap import tap_paths
from meshd.worker.access_log import AccessLog
from meshd.worker.authorize import Gate, load_provider
from meshd.worker.balancer import SharedBalancer
from meshd.worker.decisions import DecisionRing
from meshd.worker.identity import WorkerIdentity
from meshd.worker.retries import RetryBudgets
from meshd.worker.routing import Router
from meshd.worker.serve import serve_connection
from meshd.worker.tap import TapSender
from meshd.worker.tracing import Tracer
from meshd.worker.upstream.http1 import REAP_EVERY, Pool
from meshd.worker.upstream.tls import UpstreamTls

if TYPE_CHECKING:
    from meshd.master.spawn import ProcessContext
    from meshd.worker.context import Idler
    from meshd.worker.upstream.h2_pool import H2Pool

log = logging.getLogger("meshd.worker")

HEARTBEAT_INTERVAL = 1.0
SNAPSHOT_POLL = 0.1         # a stat() of the snapshot file; discovery changes reach traffic this fast
SNAPSHOT_BOOT_WAIT = 30.0
# From boot: the master gives a generation boot_timeout (60 s by default) to serve; a worker that
# has no identity by then says so in its own line before the master gives up.
IDENTITY_BOOT_WAIT = 50.0
ASK_POLL = 0.02              # while a request waits for a service to be discovered
MAX_ID_BYTES = 2048          # a SPIFFE ID's bound (meshd.identity.spiffe)
ASK_INTERVAL = 1.0          # a worker asks for the same unknown service at most this often
IDLE_CLOSE_GRACE = 1.0        # while draining, a keep-alive connection idle this long is closed
ACCEPT_ERROR_BACKOFF = 0.05
# Accept balancing: a worker holding more than ACCEPT_SLACK client connections above its
# least loaded sibling waits ACCEPT_DEFER before it accepts, so that the sibling (woken
# by the same listening socket) takes the pending connection if it is free to.
ACCEPT_SLACK = 1
ACCEPT_DEFER = 0.002
LINGER_SECONDS = 0.5
LINGER_BYTES = 1 << 20


class Worker:
    def __init__(self, ctx: ProcessContext) -> None:
        self.ctx = ctx
        self.config: Config = ctx.config
        self.region = ctx.region
        self.slot = ctx.slot
        self.stripe: Stripe = ctx.region.stripe(ctx.slot)
        self.retries = RetryBudgets(ctx.region, self.stripe)
        self.balancer = SharedBalancer(ctx.region, ctx.slot, ctx.config.balancer.ewma_decay,
                                       ctx.config.balancer.default_rtt)
        self.pool = Pool(counter=self.balancer.connection_delta,
                         connections=self.balancer.connections)
        self.router = Router(ctx.config)
        self.authz = Gate(ctx.config, load_provider(ctx.config))
        self.tls = UpstreamTls(ctx.config)  # contexts of services with [service.X.tls]
        self.identity: WorkerIdentity | None = None
        if ctx.config.identity is not None:
            self.identity = WorkerIdentity(
                identity_paths(ctx.config.shm_dir, ctx.config.instance, ctx.master_pid),
                ctx.config.identity.trust_domain)
        self._h2pool: H2Pool | None = None
        self.snapshot: Snapshot
        self._snapshot_mtime = 0
        self._snapshot_log = Throttle(log, burst=3)
        alog = ctx.config.access_log
        self.access_log = AccessLog(alog) if alog is not None else None
        # tap: None unless someone taps (the snapshot poll follows the control's filter file)
        self.tap: TapSender | None = None
        self._tap = TapSender(*tap_paths(ctx.config.shm_dir, ctx.config.instance,
                                         ctx.master_pid, ctx.generation))
        self._tap.stripe = self.stripe   # its counts outlive the worker (meshd.shm)
        self.pool.events = self.stripe   # idle connections reaped, counted per row
        if self.access_log is not None:
            self.access_log.stripe = self.stripe
        traces = ctx.config.tracing
        self.tracer = Tracer(traces, self.stripe) if traces is not None else None
        # one test at the end of each request (meshd.worker.observe); follows self.tap
        self.observing = self.access_log is not None
        self.decisions: DecisionRing | None = None   # created at boot, in the slot's file
        self.draining = False
        self.stopped = gevent.event.Event()
        self.listeners: list[tuple[ListenerConfig, socket.socket]] = []
        self.connections: dict[gevent.Greenlet, Idler | None] = {}
        self._asked: dict[str, float] = {}
        self._asked_rows: dict[tuple[str, str], float] = {}
        self._authority_counts: tuple[object, dict[str, int]] = (None, {})
        self._ask_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._ask_sock.setblocking(False)
        self._control_path = control_socket_path(ctx.config.shm_dir, ctx.config.instance,
                                                 ctx.master_pid, ctx.generation)

    # -- boot ---------------------------------------------------------------------------

    def boot(self) -> None:
        self.region.heartbeat(self.slot)
        gevent.spawn(self._heartbeat_loop)
        started = time.monotonic()
        self._wait_snapshot()
        self._wait_identity(started)
        if self.access_log is not None:
            self.access_log.open()
        if self.tracer is not None:
            self.tracer.start()
        self.decisions = DecisionRing.open(self.config.shm_dir, self.config.instance,
                                           self.ctx.master_pid, self.slot, os.getpid(),
                                           self.ctx.generation)
        if self.access_log is not None and self.decisions is not None:
            self.access_log.publish = self.decisions.set_dropped
        for lst in self.config.listeners:
            raw = self.ctx.sockets[address_key(lst.listen)]
            sock = socket.socket(raw.family, raw.type, raw.proto, fileno=raw.detach())
            self.listeners.append((lst, sock))
        gevent.signal_handler(signal.SIGTERM, self.drain)
        gevent.signal_handler(signal.SIGINT, self.stopped.set)
        gevent.signal_handler(signal.SIGQUIT, self.stopped.set)
        for lst, sock in self.listeners:
            gevent.spawn(self._accept_loop, lst, sock)
        gevent.spawn(self._snapshot_loop)
        gevent.spawn(self._reap_loop)
        self.region.heartbeat(self.slot, STATE_SERVING)
        log.info("worker %d (g%d, slot %d) serving", os.getpid(), self.ctx.generation, self.slot)

    def _wait_snapshot(self) -> None:
        deadline = time.monotonic() + SNAPSHOT_BOOT_WAIT
        while not self._load_snapshot():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no endpoint snapshot at {self.ctx.snapshot_path} "
                                   f"after {SNAPSHOT_BOOT_WAIT:.0f}s (is the control process up?)")
            gevent.sleep(0.02)

    def _wait_identity(self, started: float) -> None:
        """With [identity]: wait until the control process published material and this
        worker loaded it (inbound mTLS and meshed upstreams need it from the first
        connection)."""
        ident = self.identity
        if ident is None:
            return
        deadline = started + IDENTITY_BOOT_WAIT
        while True:
            ident.refresh()
            if ident.ready():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"no workload identity loaded after {IDENTITY_BOOT_WAIT:.0f}s "
                                   f"({ident.error or 'nothing published at ' + ident.paths.pem}; "
                                   "see the control process's identity lines)")
            gevent.sleep(0.05)

    def _load_snapshot(self) -> bool:
        try:
            mtime = os.stat(self.ctx.snapshot_path).st_mtime_ns
        except FileNotFoundError:
            return False
        if mtime == self._snapshot_mtime:
            return True
        try:
            self.snapshot = read_snapshot(self.ctx.snapshot_path)
        except (OSError, ValueError) as e:   # retried every poll: throttled
            self._snapshot_log.log(logging.ERROR, "snapshot", "cannot read endpoint snapshot "
                                   "%s: %s", self.ctx.snapshot_path, e)
            return hasattr(self, "snapshot")
        self._snapshot_mtime = mtime
        self.router.set_fleet(self.snapshot.fleet_version, self.snapshot.fleet)
        self.authz.set_fleet(self.router.fleet)   # fleet authorization of inbound listeners
        self.retries.set_groups(rowkeys.authority_groups(self.snapshot.rows))
        self.region.set_snapshot_seq(self.slot, self.snapshot.seq)  # for /ready and tests
        return True

    @property
    def h2pool(self) -> H2Pool:
        """HTTP/2 connections to upstreams (h2 is imported on first use: worker boot
        stays light for meshes that never speak HTTP/2)."""
        if self._h2pool is None:
            from meshd.worker.upstream.h2_pool import H2Pool
            self._h2pool = H2Pool()
            self._h2pool.events = self.stripe   # PING timeouts, idle closes, per row
        return self._h2pool

    def resolve(self, service: str) -> tuple[Endpoint, ...] | None:
        """The endpoints of ``service``; None when no source knows it. A service nobody
        watches yet is asked for (the control process starts a watch) and waited for, up
        to ``discovery_wait``."""
        snap = self.snapshot
        endpoints = snap.services.get(service)
        # A watched service whose source fails is an answer too: no waiting for it.
        if endpoints is not None or service in snap.absent or service in snap.errors:
            return endpoints
        wait = self.config.discovery_wait
        if wait <= 0:
            return None
        self._ask_control(service)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            gevent.sleep(ASK_POLL)
            self._ask_control(service)   # again only if the last ask did not go out
            self._load_snapshot()
            snap = self.snapshot
            endpoints = snap.services.get(service)
            if endpoints is not None or service in snap.absent or service in snap.errors:
                return endpoints
        return None

    def _ask_control(self, service: str) -> None:
        now = time.monotonic()
        if now - self._asked.get(service, -ASK_INTERVAL) < ASK_INTERVAL:
            return
        if len(self._asked) > 10_000:
            self._asked.clear()
        self._asked[service] = now
        try:
            self._ask_sock.sendto(service.encode(), self._control_path)
        except OSError as e:
            # The control process is restarting, or its socket's queue is full (a flood of
            # made-up names): the waiting request asks again at its next poll.
            del self._asked[service]
            log.debug("cannot ask the control process for %s: %s", service, e)

    def ask_row(self, listener: str, client_id: str) -> None:
        """Ask the control process for the metric rows of a client identity seen on
        ``listener`` (``meshd.rowkeys``): at most once per ASK_INTERVAL per identity."""
        now = time.monotonic()
        asked = (listener, client_id)
        if now - self._asked_rows.get(asked, -ASK_INTERVAL) < ASK_INTERVAL:
            return
        if len(self._asked_rows) >= 1024:  # bounded: identities come from certificates
            self._asked_rows.clear()
        self._asked_rows[asked] = now
        try:
            self._ask_sock.sendto(rowkeys.ROW_REQUEST + listener.encode() + b"\0"
                                  + client_id.encode()[:MAX_ID_BYTES], self._control_path)
        except OSError as e:
            log.debug("cannot ask the control process for the rows of %s: %s", listener, e)

    def ask_authority_row(self, listener: str, base_key: str, authority: str) -> None:
        """Ask the control process for the metric row of ``authority`` beside the row of
        ``base_key`` (``meshd.rowkeys``): at most once per ASK_INTERVAL each; the table of
        asks is bounded (the Host is the client's to choose)."""
        now = time.monotonic()
        asked = (listener, base_key + "\0" + authority)
        if now - self._asked_rows.get(asked, -ASK_INTERVAL) < ASK_INTERVAL:
            return
        if len(self._asked_rows) >= 1024:
            self._asked_rows.clear()
        self._asked_rows[asked] = now
        try:
            self._ask_sock.sendto(rowkeys.AUTHORITY_REQUEST + listener.encode() + b"\0"
                                  + base_key.encode()[:MAX_ID_BYTES] + b"\0"
                                  + authority.encode("latin-1"), self._control_path)
        except OSError as e:
            log.debug("cannot ask the control process for an authority row of %s: %s",
                      listener, e)

    def authority_rows(self, listener: str) -> int:
        """Rows with an authority the current snapshot gives ``listener`` (counted once
        per snapshot)."""
        snap = self.snapshot
        if self._authority_counts[0] is not snap:
            self._authority_counts = (snap, {
                name: sum(1 for k in by_key if rowkeys.parts(k).authority)
                for name, by_key in snap.rows.items()})
        return self._authority_counts[1].get(listener, 0)

    def _snapshot_loop(self) -> None:
        while not self.stopped.is_set():
            gevent.sleep(SNAPSHOT_POLL)
            self._load_snapshot()
            if self.identity is not None:
                self.identity.refresh()   # a stat; every handshake refreshes too
            self.tap = self._tap.poll()
            self.observing = self.access_log is not None or self.tap is not None

    def _reap_loop(self) -> None:
        """Idle upstream HTTP/1.1 connections past their idle_timeout, or closed by the
        upstream while idle, are closed; HTTP/2 ones close themselves (H2Upstream's
        watchdog) and are forgotten here."""
        while not self.stopped.is_set():
            gevent.sleep(REAP_EVERY)
            try:
                self.pool.reap(time.monotonic())
                if self._h2pool is not None:
                    self._h2pool.reap()
            except Exception:  # keep reaping; a bug here must not end the worker
                log.exception("reaping idle upstream connections failed")

    def _heartbeat_loop(self) -> None:
        while True:
            if os.getppid() != self.ctx.master_pid:  # orphaned: the master was killed
                log.error("master %d is gone; exiting", self.ctx.master_pid)
                os._exit(1)
            self.region.heartbeat(self.slot)
            ratelog.flush_all()   # the suppressed counts of bursts that are over
            now = time.monotonic()
            rows = min(self.region.rows, self.region.rows_used)  # rows 0 and 1 included
            self.retries.sample_all(rows, self.balancer.live_slots(now), now)
            gevent.sleep(HEARTBEAT_INTERVAL)

    # -- accepting ----------------------------------------------------------------------

    def _accept_loop(self, lst: ListenerConfig, sock: socket.socket) -> None:
        key = (lst.service or "") if lst.protocol == "tcp" and lst.direction == "outbound" else ""
        slots = gevent.lock.BoundedSemaphore(lst.max_connections)
        backoff = ACCEPT_ERROR_BACKOFF
        while not self.draining:
            slots.acquire()  # at max_connections, the rest wait in the kernel's accept queue
            self._accept_turn()
            try:
                client, _ = sock.accept()
            except OSError as e:
                slots.release()
                if self.draining:
                    return
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: back off (doubling to a second) and
                    # log once per streak; the connections already open go on.
                    if backoff == ACCEPT_ERROR_BACKOFF:
                        log.error("%s: accept failed (%s); backing off", lst.name, e.strerror)
                    gevent.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                continue
            if backoff != ACCEPT_ERROR_BACKOFF:
                log.info("%s: accepting again", lst.name)
                backoff = ACCEPT_ERROR_BACKOFF
            row = self.snapshot.row(lst.name, key)
            g = gevent.spawn(self._serve, lst, client, ROW_OVERFLOW if row is None else row, slots)
            self.connections[g] = None
            self.region.set_open_connections(self.slot, len(self.connections))

    def _accept_turn(self) -> None:
        """Accept balancing. Every worker waits on the same listening sockets and the one
        that runs first takes every connection pending, so a burst of a few long-lived
        connections (HTTP/2 clients, meshd peers) can all land on one worker while the
        other idles. A worker ahead of its least loaded sibling by more than ACCEPT_SLACK
        connections waits ACCEPT_DEFER first (once per connection, so a busy sibling
        delays accepting by that much at most)."""
        mine = len(self.connections)
        if mine <= ACCEPT_SLACK:
            return
        fewest = self.region.fewest_connections(self.slot, self.ctx.generation)
        if fewest is not None and mine > fewest + ACCEPT_SLACK:
            gevent.sleep(ACCEPT_DEFER)

    def _serve(self, lst: ListenerConfig, client: socket.socket, row: int,
               slots: gevent.lock.BoundedSemaphore) -> None:
        stripe = self.stripe
        stripe.add(row, F_TCP_OPEN_TOTAL)
        stripe.add(row, F_TCP_OPEN)
        me = gevent.getcurrent()
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            serve_connection(self, lst, client)
        except gevent.GreenletExit:
            pass
        except Exception:
            log.exception("%s: connection handler failed", lst.name)
        finally:
            _close_gracefully(client)
            self.connections.pop(me, None)
            if not self.draining:
                self.region.set_open_connections(self.slot, len(self.connections))
            slots.release()
            stripe.add(row, F_TCP_CLOSE_TOTAL)
            stripe.sub(row, F_TCP_OPEN)

    # -- stopping -----------------------------------------------------------------------

    def drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        self.region.heartbeat(self.slot, STATE_DRAINING)
        for _, sock in self.listeners:
            sock.close()
        log.info("worker %d draining %d connections", os.getpid(), len(self.connections))
        gevent.spawn(self._drain_loop)

    def _drain_loop(self) -> None:
        deadline = time.monotonic() + self.config.drain_timeout
        while self.connections and time.monotonic() < deadline:
            now = time.monotonic()
            for g, conn in list(self.connections.items()):
                if conn is not None and conn.idle_since and now - conn.idle_since >= IDLE_CLOSE_GRACE:
                    g.kill(block=False)
            gevent.sleep(0.1)
        if self.connections:
            log.warning("worker %d: drain_timeout reached with %d connections open",
                        os.getpid(), len(self.connections))
        self.stopped.set()

    def run(self) -> int:
        self.stopped.wait()
        self.pool.close_all()
        if self._h2pool is not None:
            self._h2pool.close_all()
        if self.access_log is not None:
            self.access_log.flush()  # the lines of the last FLUSH_INTERVAL
        if self.tracer is not None:
            self.tracer.flush(timeout=1.0)  # the last spans, if the collector is quick
        return 0


def _close_gracefully(sock: socket.socket) -> None:
    """Half-close, then close: unread bytes left in a closed socket make the kernel send
    RST, which can destroy the response the client has not read yet. Bounded: at most
    LINGER_BYTES read and LINGER_SECONDS waited."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(LINGER_SECONDS)
        left = LINGER_BYTES
        while left > 0 and (data := sock.recv(65536)):
            left -= len(data)
    except OSError:
        pass
    finally:
        sock.close()


def main(ctx: ProcessContext) -> int:
    from meshd.master.spawn import EXIT_BOOT_ERROR

    worker = Worker(ctx)
    try:
        worker.boot()
    except Exception as e:
        log.error("worker %d could not boot: %s", os.getpid(), e)
        return EXIT_BOOT_ERROR
    return worker.run()
