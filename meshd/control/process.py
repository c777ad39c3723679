"""The control process's life: gevent-patched first, then the identity provider (with
``[identity]``: ``meshd.control.identity`` publishes the workload certificate workers
read), discovery, the snapshot file workers read, the admin server and a heartbeat. TERM or INT end it (the master starts
the next generation's control process before it stops this one)."""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402

from meshd import ratelog, rowkeys  # noqa: E402
from meshd.control.admin import (  # noqa: E402
    DRAIN_IDLE,
    HEAD_TIMEOUT,
    AdminApp,
    AdminServer,
    drain,
)
from meshd.control.counters import COUNTERS  # noqa: E402
from meshd.control.discovery import DiscoveryRunner  # noqa: E402
from meshd.control.identity import IdentityRunner  # noqa: E402
from meshd.control.recent_errors import RecentErrors, observe  # noqa: E402
from meshd.control.tap import TapHub  # noqa: E402
from meshd.identity import paths as identity_paths  # noqa: E402
from meshd.master.sockets import address_key  # noqa: E402
from meshd.metrics import StatWindow, row_keys  # noqa: E402
from meshd.shm import OFF_RELOAD_FAILURES, STATE_SERVING  # noqa: E402
from meshd.snapshot import Snapshot, control_socket_path, snapshot_path  # noqa: E402
from meshd.snapshot import read as read_snapshot  # noqa: E402
from meshd.tap import tap_paths  # noqa: E402

if TYPE_CHECKING:
    from meshd.master.spawn import ProcessContext

log = logging.getLogger("meshd.control")

HEARTBEAT_INTERVAL = 1.0
SERVICE_NAME = re.compile(r"[A-Za-z0-9_.@:-]{1,253}")
STATS_INTERVAL = 1.0


class Control:
    def __init__(self, ctx: ProcessContext) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.region = ctx.region
        self.stopped = gevent.event.Event()
        self.fast = False   # INT/QUIT (a fast stop): no drain of the admin connections
        # This process's counters go to its slot's table in the region (a new control
        # process continues them): bound before anything counts.
        COUNTERS.bind(ctx.region, ctx.slot)
        self.stat_window = StatWindow()
        self._last_sample = 0.0
        self.recent_errors = RecentErrors(ctx.region.get_u64(OFF_RELOAD_FAILURES))
        previous = _previous_snapshot(ctx)
        self.discovery = DiscoveryRunner(ctx.config, ctx.region, ctx.generation,
                                         ctx.snapshot_path, previous)
        self.identity: IdentityRunner | None = None
        if ctx.config.identity is not None:
            self.identity = IdentityRunner(ctx.config, identity_paths(
                ctx.config.shm_dir, ctx.config.instance, ctx.master_pid))
        self.server: AdminServer | None = None
        self.probe_server: AdminServer | None = None
        self.control_path = ""
        self.tap: TapHub | None = TapHub(self, *tap_paths(
            ctx.config.shm_dir, ctx.config.instance, ctx.master_pid, ctx.generation))

    def boot(self) -> None:
        self.region.heartbeat(self.ctx.slot)
        gevent.spawn(self._heartbeat_loop)
        gevent.signal_handler(signal.SIGTERM, self.stopped.set)
        gevent.signal_handler(signal.SIGINT, self._stop_fast)
        gevent.signal_handler(signal.SIGQUIT, self._stop_fast)
        if self.identity is not None:
            self.identity.start()
        self.discovery.start()
        self._bind_control_socket()
        if self.tap is not None:
            self.tap.start()
        raw = self.ctx.sockets[address_key(self.config.admin.listen)]
        sock = socket.socket(raw.family, raw.type, raw.proto, fileno=raw.detach())
        self.server = AdminServer(sock, AdminApp(self), log=None, error_log=log)
        self.server.start()
        probe = self.config.admin.probe_listen
        if probe is not None:
            raw = self.ctx.sockets[address_key(probe)]
            sock = socket.socket(raw.family, raw.type, raw.proto, fileno=raw.detach())
            self.probe_server = AdminServer(sock, AdminApp(self, probe_only=True), log=None,
                                            error_log=log)
            self.probe_server.counted = False   # not in /metrics
            self.probe_server.start()
        first = gevent.spawn(self.discovery.first_published.wait)
        gevent.joinall([first, gevent.spawn(self.stopped.wait)], count=1)
        if not self.discovery.first_published.is_set():
            return  # told to stop while discovery was still starting
        gevent.spawn(self._stats_loop)
        self.region.heartbeat(self.ctx.slot, STATE_SERVING)
        log.info("control %d (g%d) serving admin on %s", os.getpid(), self.ctx.generation,
                 self.config.admin.listen)

    def _stop_fast(self) -> None:
        self.fast = True
        self.stopped.set()

    def _bind_control_socket(self) -> None:
        path = control_socket_path(self.config.shm_dir, self.config.instance,
                                   self.ctx.master_pid, self.ctx.generation)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        mask = os.umask(0o177)   # the socket file is 0600 from the start (bind has no mode)
        try:
            sock.bind(path)
        finally:
            os.umask(mask)
        self.control_path = path
        gevent.spawn(self._control_socket_loop, sock)

    def _control_socket_loop(self, sock: socket.socket) -> None:
        """Workers name services their clients asked for that nobody watches yet, and
        client identities they saw that have no metric row yet (``meshd.rowkeys``)."""
        while True:
            data = sock.recv(4096)
            if data.startswith(rowkeys.AUTHORITY_REQUEST):
                listener, _, rest = data[len(rowkeys.AUTHORITY_REQUEST):].partition(b"\0")
                base_key, _, authority = rest.partition(b"\0")
                self.discovery.authority_row(listener.decode("utf-8", "replace"),
                                             base_key.decode("utf-8", "replace"),
                                             authority.decode("latin-1"))
                continue
            if data.startswith(rowkeys.ROW_REQUEST):
                listener, _, client_id = data[len(rowkeys.ROW_REQUEST):].partition(b"\0")
                self.discovery.client_row(listener.decode("utf-8", "replace"),
                                          client_id.decode("utf-8", "replace"))
                continue
            name = data.decode("utf-8", "replace")
            if SERVICE_NAME.fullmatch(name):
                self.discovery.watch(name, on_demand=True)

    def sample_stats(self) -> None:
        now = time.monotonic()
        if now - self._last_sample >= 0.5:
            self._last_sample = now
            keys = row_keys(self.config, self.discovery.rows.rows)
            self.stat_window.take(self.region, sorted(keys), now)
            observe(self.recent_errors, self.region, self.stat_window.samples[-1].totals,
                    {row: k.service for row, k in keys.items()}, self.discovery)

    def _stats_loop(self) -> None:
        while True:
            self.sample_stats()
            gevent.sleep(STATS_INTERVAL)

    def _heartbeat_loop(self) -> None:
        while True:
            if os.getppid() != self.ctx.master_pid:  # orphaned: the master was killed
                log.error("master %d is gone; exiting", self.ctx.master_pid)
                os._exit(1)
            self.region.heartbeat(self.ctx.slot)
            ratelog.flush_all()   # the suppressed counts of bursts that are over
            gevent.sleep(HEARTBEAT_INTERVAL)

    def run(self) -> int:
        self.stopped.wait()
        # Stop accepting at once (the next generation's control process, serving already
        # on a reload, takes every new admin and probe connection), end the tap streams,
        # then answer what was accepted: exiting now would reset those connections.
        servers = [s for s in (self.server, self.probe_server) if s is not None]
        open_conns = sum(len(s.conns) for s in servers)
        if self.tap is not None:
            self.tap.end_streams()
        started = time.monotonic()
        # Within the master's patience for a retired process (drain_timeout + KILL_GRACE);
        # a fast stop closes them at once, as its workers do.
        limit = 0.0 if self.fast else min(HEAD_TIMEOUT,
                                          max(DRAIN_IDLE, self.config.drain_timeout))
        cut = drain(servers, limit)
        log.info("control %d (g%d) stopped: admin closed its listeners and drained %d "
                 "connection(s) in %.1fs (%d cut with a request begun)", os.getpid(),
                 self.ctx.generation, open_conns, time.monotonic() - started, cut)
        if self.control_path:
            try:
                os.unlink(self.control_path)
            except FileNotFoundError:
                pass
        if self.tap is not None:
            self.tap.close()
        self.discovery.close()
        if self.identity is not None:
            self.identity.close()
        return 0


def main(ctx: ProcessContext) -> int:
    from meshd.master.spawn import EXIT_BOOT_ERROR

    control = Control(ctx)
    try:
        control.boot()
    except Exception as e:
        log.error("control process %d could not boot: %s", os.getpid(), e)
        return EXIT_BOOT_ERROR
    return control.run()


PREVIOUS_GENERATIONS = 16   # how far back a control process looks for a published snapshot


def _previous_snapshot(ctx: ProcessContext) -> Snapshot | None:
    """The row map to keep: the previous generation's snapshot or, when that generation
    never published one (a HUP superseded it while it booted), the newest older one
    still on disk. Rows assigned on demand (authorities, client identities) are only
    known from there: starting afresh would give their rows other meanings."""
    cfg = ctx.config
    # This generation's own snapshot first: a control process that replaces a killed one
    # of the same generation keeps the rows that one assigned (on demand ones too).
    paths = [ctx.snapshot_path, *([ctx.previous_snapshot_path]
                                  if ctx.previous_snapshot_path else [])] + [
        snapshot_path(cfg.shm_dir, cfg.instance, ctx.master_pid, gen)
        for gen in range(ctx.generation - 2, max(0, ctx.generation - PREVIOUS_GENERATIONS), -1)]
    for path in paths:
        try:
            return read_snapshot(path)
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            log.warning("previous snapshot %s unreadable (%s)", path, e)
    if ctx.previous_snapshot_path:   # a first generation has none to find
        log.warning("no previous snapshot readable; shm rows start afresh")
    return None
