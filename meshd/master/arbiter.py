"""The master loop: signals, reaping, heartbeats, keeping N workers and one control
process alive, reloads by generations, binary upgrade.

Signal handlers only queue the signal; ``set_wakeup_fd`` wakes the loop, which calls
``handle_<name>``. Processes belong to a config generation: a reload (HUP) starts
generation G+1 (control process and workers) beside G, and only when every new process
serves are the older ones told to drain. A reload that fails to validate or to boot
leaves generation G serving.

Each generation maps its own shared-memory region (it can grow on a reload);
``meshd.master.regions.RegionSet`` keeps them, told by this loop when a generation
begins, serves or is abandoned and when a process is reaped.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import time
from dataclasses import dataclass

from meshd import logs
from meshd.config import Address, Config
from meshd.decisions import ring_path
from meshd.errors import ConfigError, MeshdError
from meshd.identity import paths as identity_paths
from meshd.master.notify import Notifier, scrub_env
from meshd.master.regions import RegionSet
from meshd.master.sockets import UPGRADE_ENV, SocketSet, address_key, inherited
from meshd.master.spawn import EXIT_BOOT_ERROR, ProcessContext, fork_child
from meshd.master.upgrade import Carry, copy_snapshot, open_old, sizes
from meshd.private_files import UNIX_PATH_MAX, prepare_dir
from meshd.shm import (
    KIND_CONTROL,
    KIND_WORKER,
    OFF_DESIRED,
    OFF_GENERATION,
    OFF_RELOAD_FAILURES,
    OFF_RELOADS,
    OFF_RESTARTS,
    STATE_BOOTING,
    STATE_SERVING,
    Region,
    slot_count_for,
)
from meshd.snapshot import control_socket_path, snapshot_path
from meshd.tap import tap_paths
from meshd.validate import load_checked

log = logging.getLogger("meshd.master")

UPGRADE_FROM_ENV = "MESHD_UPGRADE_FROM"
ABRT_GRACE = 2.0             # after ABRT, a hung process gets KILL this much later
KILL_GRACE = 5.0             # beyond drain_timeout before a draining process is killed
FAST_STOP_GRACE = 3.0        # INT/QUIT: children get this long before KILL
SIGNALS = ("HUP", "TERM", "INT", "QUIT", "TTIN", "TTOU", "USR2", "CHLD")


@dataclass
class Child:
    pid: int
    slot: int
    kind: int
    generation: int
    spawned: float
    region: Region                       # the region it maps (its generation's)
    retired_at: float | None = None      # TERM sent: it is draining and will not be replaced
    abrt_at: float | None = None

    @property
    def name(self) -> str:
        return f"{'worker' if self.kind == KIND_WORKER else 'control'} {self.pid} (g{self.generation})"


class Arbiter:
    def __init__(self, cfg: Config, workers_override: int | None = None,
                 log_level_override: str | None = None) -> None:
        self.cfg = cfg
        self.workers_override = workers_override
        self.log_level_override = log_level_override
        self.desired = workers_override or cfg.workers
        self.configs: dict[int, Config] = {1: cfg}
        self.generation = 1             # the newest generation (may still be booting)
        self.active_generation = 0      # the newest generation that has served
        self.from_reload = False        # the newest generation came from an accepted HUP
        self.generation_started = time.monotonic()
        self.children: dict[int, Child] = {}
        self.sockets = SocketSet()
        self.notifier = Notifier()
        self.notify_env = {k: v for k, v in os.environ.items()
                           if k in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        self.upgrade_from = int(os.environ.pop(UPGRADE_FROM_ENV, "0") or 0)
        self.upgrade_pid = 0
        self.stopping: str | None = None   # "graceful" | "fast"
        self.stop_after = 0.0              # TERM during shutdown_delay: drain from then on
        self.stop_deadline = 0.0
        self.exit_code = 0
        self.signal_queue: list[str] = []
        self.respawn_failures = 0
        self.next_spawn_at = 0.0
        self.last_watchdog = 0.0
        self.regions = RegionSet(cfg.shm_dir, cfg.instance)
        self.carry: Carry | None = None          # a binary upgrade's old master's counts
        self.inherited_snapshot: str | None = None   # its snapshot, for generation 1
        self._wake_r, self._wake_w = -1, -1

    # -- life cycle ---------------------------------------------------------------------

    def run(self) -> int:
        try:
            self._start()
        except ConfigError as e:
            e.path = e.path or self.cfg.path
            for line in e.lines():
                log.error("%s", line)
            return 2
        except MeshdError as e:
            log.error("%s", e)
            return 1
        try:
            while True:
                self._sleep(0.25 if self.stopping or self.stop_after
                            or self.active_generation < self.generation else 1.0)
                self._dispatch_signals()
                if self.stop_after and not self.stopping and time.monotonic() >= self.stop_after:
                    self._begin_stop("graceful")
                self._reap()
                if self.stopping:
                    if not self.children:
                        break
                    self._enforce_stop_deadline()
                    continue
                self._check_heartbeats()
                self._maintain()
                self._advance_generation()
                self.regions.sync(self.children.values())
                if self.carry is not None and not self.carry.step(self.regions.open_regions):
                    self.carry = None   # the old master is gone: its slots are free
                self._watchdog()
        finally:
            self._cleanup()
        log.info("master %d exits with %d", os.getpid(), self.exit_code)
        return self.exit_code

    def _start(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for name in SIGNALS:
            signal.signal(getattr(signal, f"SIG{name}"), self._on_signal)
        scrub_env()
        self.sockets.adopt(inherited())
        self._open_sockets(self.cfg)
        self._prepare_dirs()
        cfg = self.cfg
        old = open_old(cfg.shm_dir, cfg.instance, self.upgrade_from) if self.upgrade_from else None
        self.regions.create(self.generation, *sizes(old, slot_count_for(max(self.desired, 64)),
                                                    cfg.metric_rows, cfg.endpoint_rows))
        if old is not None:
            self.carry = Carry(old, self.upgrade_from)
            self.carry.start(self.regions.current)
            self.inherited_snapshot = copy_snapshot(old, cfg.shm_dir, cfg.instance,
                                                    self.upgrade_from)
        self.regions.current.set_u64(OFF_GENERATION, self.generation)
        self.regions.current.set_u32(OFF_DESIRED, self.desired)
        log.info("master %d: %d workers, listening on %s", os.getpid(), self.desired,
                 ", ".join(sorted(self.sockets.by_address)))

    def _prepare_dirs(self) -> None:
        """The private directories (``meshd.private_files``): a foreign or shared one is a
        config error (exit 2). Without a ``state_dir`` endpoints are not persisted."""
        cfg = self.cfg
        prepare_dir(cfg.shm_dir, "shm_dir")
        longest = control_socket_path(cfg.shm_dir, cfg.instance, 2**22, 10**6)
        if len(os.fsencode(longest)) > UNIX_PATH_MAX:
            raise ConfigError([("shm_dir", f"too long for the control sockets kept in it (a "
                                           f"unix socket path has at most {UNIX_PATH_MAX} bytes)")],
                              cfg.path)
        if not prepare_dir(cfg.state_dir, "state_dir", optional=True):
            log.warning("state_dir %s cannot be created: endpoints will not be persisted",
                        cfg.state_dir)

    def _open_sockets(self, cfg: Config) -> None:
        wanted = [(lst.listen, lst.backlog) for lst in cfg.listeners]
        wanted += [(addr, 128) for addr in _admin_addresses(cfg)]
        self.sockets.ensure(wanted)

    def _cleanup(self) -> None:
        for child in list(self.children.values()):
            _kill(child.pid, signal.SIGKILL)
        self.sockets.close_all()
        for slot in range(self.regions.current.slots):
            _unlink(ring_path(self.cfg.shm_dir, self.cfg.instance, os.getpid(), slot))
        self.regions.unlink_all()
        for gen in range(0, self.generation + 1):   # 0: a binary upgrade's inherited one
            _unlink(self._snapshot_path(gen))
            _unlink(control_socket_path(self.cfg.shm_dir, self.cfg.instance, os.getpid(), gen))
            for path in tap_paths(self.cfg.shm_dir, self.cfg.instance, os.getpid(), gen):
                _unlink(path)   # a control process killed with its tap open leaves them
        published = identity_paths(self.cfg.shm_dir, self.cfg.instance, os.getpid())
        _unlink(published.pem)    # a key in tmpfs outlives nothing of meshd
        _unlink(published.roots)

    # -- signals ------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: object) -> None:
        if len(self.signal_queue) < 16:
            self.signal_queue.append(signal.Signals(signum).name[3:])

    def _sleep(self, timeout: float) -> None:
        try:
            ready, _, _ = select.select([self._wake_r], [], [], timeout)
            if ready:
                while os.read(self._wake_r, 4096):
                    pass
        except (BlockingIOError, InterruptedError):
            pass

    def _dispatch_signals(self) -> None:
        while self.signal_queue:
            name = self.signal_queue.pop(0)
            getattr(self, f"handle_{name.lower()}")()

    def handle_chld(self) -> None:
        pass  # the loop reaps after every wake-up

    def handle_term(self) -> None:
        delay = self.cfg.shutdown_delay
        if delay > 0 and not self.stopping and not self.stop_after:
            # A pod's containers all get TERM at once: the application may still call
            # out (through these listeners) while it shuts down, so keep serving first.
            self.stop_after = time.monotonic() + delay
            log.info("TERM: serving on for shutdown_delay (%.1fs), then draining", delay)
            self.notifier.stopping()
            return
        self._begin_stop("graceful")  # a second TERM during the delay does not wait

    def handle_int(self) -> None:
        self._begin_stop("fast")

    handle_quit = handle_int

    def handle_ttin(self) -> None:
        self.desired += 1
        self._set_desired()

    def handle_ttou(self) -> None:
        if self.desired > 1:
            self.desired -= 1
            self._set_desired()

    def _set_desired(self) -> None:
        log.info("worker count set to %d", self.desired)
        self.regions.current.set_u32(OFF_DESIRED, self.desired)

    def handle_hup(self) -> None:
        if self.stopping or self.stop_after:
            return
        log.info("reloading %s", self.cfg.path)
        try:
            new = load_checked(self.cfg.path, isolated=True)   # as `meshd check` does
            if new.shm_dir != self.cfg.shm_dir or new.instance != self.cfg.instance:
                raise ConfigError([("shm_dir", "shm_dir and instance cannot change on reload")],
                                  self.cfg.path)
            self._open_sockets(new)
        except ConfigError as e:
            for line in e.lines():
                log.error("reload rejected, the running config stays: %s", line)
            self.regions.current.add_u64(OFF_RELOAD_FAILURES)
            return
        except MeshdError as e:
            log.error("reload rejected, the running config stays: %s", e)
            self.regions.current.add_u64(OFF_RELOAD_FAILURES)
            return
        self.notifier.reloading()
        # A generation that was still booting is superseded at once: only the serving
        # generation and the newest one may hold slots.
        for child in self.children.values():
            if self.active_generation < child.generation:
                self._retire(child)
        self.regions.begin(self.generation + 1, new, self.children.values())
        self.generation += 1
        self.from_reload = True
        self.generation_started = time.monotonic()
        self.configs[self.generation] = new
        self.cfg = new
        if self.log_level_override is None:
            logs.set_level(new.log_level)   # the new generation is forked with it
        if self.workers_override is None:
            self.desired = new.workers
        self.regions.current.set_u64(OFF_GENERATION, self.generation)
        self.regions.current.set_u32(OFF_DESIRED, self.desired)

    def handle_usr2(self) -> None:
        if self.stopping or self.upgrade_pid:
            log.warning("USR2 ignored: %s", "stopping" if self.stopping else "an upgrade is running")
            return
        if self.upgrade_from:
            log.warning("USR2 ignored: this master is itself still replacing %d", self.upgrade_from)
            return
        env = dict(os.environ, **self.notify_env)
        env[UPGRADE_ENV] = self.sockets.fds_for_exec()
        env[UPGRADE_FROM_ENV] = str(os.getpid())
        argv = [sys.executable, "-m", "meshd", *sys.argv[1:]]
        pid = os.fork()
        if pid == 0:
            try:
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)
        self.upgrade_pid = pid
        log.info("binary upgrade: started new master %d (%s)", pid, " ".join(argv))

    def _begin_stop(self, mode: str) -> None:
        if self.stopping == "fast" or self.stopping == mode:
            return
        self.stopping = mode
        if self.upgrade_pid and _alive(self.upgrade_pid):
            # A new master took over: systemd must not hear that the service stops.
            log.info("replaced by new master %d; old generation drains", self.upgrade_pid)
        else:
            self.notifier.stopping()
        # Closing our copies now means new connections are refused as soon as every
        # worker has closed its own (the first thing a stopping worker does).
        self.sockets.close_all()
        if mode == "graceful":
            self.stop_deadline = time.monotonic() + self.cfg.drain_timeout + KILL_GRACE
            sig = signal.SIGTERM
        else:
            self.stop_deadline = time.monotonic() + FAST_STOP_GRACE
            sig = signal.SIGINT
        log.info("%s stop: signalling %d children", mode, len(self.children))
        for child in self.children.values():
            child.retired_at = child.retired_at or time.monotonic()
            _kill(child.pid, sig)

    def _enforce_stop_deadline(self) -> None:
        if time.monotonic() > self.stop_deadline:
            for child in self.children.values():
                log.warning("%s did not stop in time; killing it", child.name)
                _kill(child.pid, signal.SIGKILL)
            self.stop_deadline = time.monotonic() + 1.0

    # -- children -----------------------------------------------------------------------

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            if pid == self.upgrade_pid:
                self.upgrade_pid = 0
                log.error("binary upgrade: new master %d exited with %d; this master keeps serving",
                          pid, code)
                continue
            child = self.children.pop(pid, None)
            if child is None:
                continue
            self.regions.reaped(child.region, child.slot, self.children.values())
            if child.kind == KIND_WORKER:   # its balancer decisions go with the slot
                _unlink(ring_path(self.cfg.shm_dir, self.cfg.instance, os.getpid(), child.slot))
            how = f"exit code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
            if child.retired_at is not None:
                log.info("%s stopped (%s)", child.name, how)
                continue
            if code == EXIT_BOOT_ERROR:
                self._boot_failed(child)
                continue
            log.warning("%s died unexpectedly (%s); replacing it", child.name, how)
            self.regions.current.add_u64(OFF_RESTARTS)
            now = time.monotonic()
            self.respawn_failures = self.respawn_failures + 1 if now - child.spawned < 5 else 0
            delay = 0.0 if self.respawn_failures == 0 else min(0.1 * 2 ** self.respawn_failures, 10.0)
            self.next_spawn_at = now + delay

    def _boot_failed(self, child: Child) -> None:
        if child.generation > self.active_generation and self.active_generation > 0:
            log.error("reload failed: %s could not boot; generation %d keeps serving",
                      child.name, self.active_generation)
            self.regions.current.add_u64(OFF_RELOAD_FAILURES)
            self._abandon_generation()
            return
        log.error("%s could not boot (see its error above); halting with exit code %d",
                  child.name, EXIT_BOOT_ERROR)
        self.exit_code = EXIT_BOOT_ERROR
        self._begin_stop("fast")

    def _abandon_generation(self) -> None:
        for child in self.children.values():
            if child.generation > self.active_generation:
                self._retire(child)
        self.generation = self.active_generation
        self.from_reload = False
        self.cfg = self.configs[self.generation]
        self.regions.fall_back(self.generation, self.children.values())
        self.regions.current.set_u64(OFF_GENERATION, self.generation)

    def _retire(self, child: Child) -> None:
        if child.retired_at is None:
            child.retired_at = time.monotonic()
            _kill(child.pid, signal.SIGTERM)

    def _free_slot(self) -> int | None:
        used = {c.slot for c in self.children.values()}
        # A binary upgrade's old master's slots are copies until it is gone (upgrade.Carry).
        first = self.carry.slots if self.carry is not None else 0
        for i in range(first, self.regions.current.slots):
            if i not in used:
                return i
        return None

    def _spawn(self, kind: int) -> bool:
        region = self.regions.current
        slot = self._free_slot()
        if slot is None:
            log.error("no free process slot in shared memory (%d); spawn deferred",
                      region.slots)
            return False
        cfg = self.configs[self.generation]
        wanted = {address_key(lst.listen) for lst in cfg.listeners}
        if kind == KIND_CONTROL:
            wanted.update(address_key(addr) for addr in _admin_addresses(cfg))
        socks = {k: s for k, s in self.sockets.by_address.items() if k in wanted}
        others = [s.fileno() for k, s in self.sockets.by_address.items() if k not in wanted]
        prev = self.generation - 1 if self.generation - 1 in self.configs else None
        ctx = ProcessContext(
            config=cfg,
            generation=self.generation,
            slot=slot,
            master_pid=os.getpid(),
            region=region,
            sockets=socks,
            snapshot_path=self._snapshot_path(self.generation),
            previous_snapshot_path=(self._snapshot_path(prev) if prev
                                    else self.inherited_snapshot if self.generation == 1
                                    else None),
        )
        region.claim_slot(slot, self.generation, kind)
        pid = fork_child(ctx, kind, [self._wake_r, self._wake_w, *others])
        region.set_pid(slot, pid)
        child = Child(pid, slot, kind, self.generation, time.monotonic(), region)
        self.children[pid] = child
        log.info("spawned %s in slot %d", child.name, slot)
        return True

    def _snapshot_path(self, generation: int) -> str:
        return snapshot_path(self.cfg.shm_dir, self.cfg.instance, os.getpid(), generation)

    def _current(self, kind: int) -> list[Child]:
        return [c for c in self.children.values()
                if c.kind == kind and c.generation == self.generation and c.retired_at is None]

    def _maintain(self) -> None:
        if not self._current(KIND_CONTROL):
            self._spawn(KIND_CONTROL)
        workers = self._current(KIND_WORKER)
        if len(workers) > self.desired:
            for child in sorted(workers, key=lambda c: c.spawned)[: len(workers) - self.desired]:
                log.info("retiring %s (worker count %d)", child.name, self.desired)
                self._retire(child)
        elif len(workers) < self.desired and time.monotonic() >= self.next_spawn_at:
            for _ in range(self.desired - len(workers)):
                if not self._spawn(KIND_WORKER):
                    break

    def _advance_generation(self) -> None:
        """Once every process of the newest generation serves, retire the older ones."""
        if self.active_generation == self.generation:
            return
        current = self._current(KIND_WORKER) + self._current(KIND_CONTROL)
        serving = [c for c in current if c.region.read_slot(c.slot).state == STATE_SERVING]
        if len(serving) < self.desired + 1:
            limit = self.configs[self.generation].boot_timeout
            if time.monotonic() - self.generation_started > limit:
                log.error("generation %d not serving after %.0fs (boot_timeout)",
                          self.generation, limit)
                if self.active_generation:
                    self.regions.current.add_u64(OFF_RELOAD_FAILURES)
                    self._abandon_generation()
                else:
                    self.exit_code = EXIT_BOOT_ERROR
                    self._begin_stop("fast")
            return
        first = self.active_generation == 0
        for child in self.children.values():
            if child.generation < self.generation:
                self._retire(child)
        for gen in [g for g in self.configs if g < self.generation]:
            del self.configs[gen]
            if gen < self.generation - 1:
                _unlink(self._snapshot_path(gen))
        self.regions.serve(self.generation, self.children.values())
        # A HUP while the first generation still booted superseded it: still a reload.
        if self.from_reload:
            self.regions.current.add_u64(OFF_RELOADS)
            keep = {address_key(lst.listen) for lst in self.cfg.listeners}
            keep.update(address_key(addr) for addr in _admin_addresses(self.cfg))
            self.sockets.close_unused(keep)
        self.active_generation = self.generation
        self.from_reload = False
        log.info("generation %d serving with %d workers", self.generation, self.desired)
        self.notifier.ready(f"serving generation {self.generation}")
        if first and self.upgrade_from and os.getppid() == self.upgrade_from:
            log.info("binary upgrade: telling the old master %d to drain", self.upgrade_from)
            _kill(self.upgrade_from, signal.SIGTERM)
            self.upgrade_from = 0

    def _check_heartbeats(self) -> None:
        now = time.monotonic()
        for child in list(self.children.values()):
            if child.abrt_at is not None:
                if now - child.abrt_at > ABRT_GRACE:
                    _kill(child.pid, signal.SIGKILL)
                continue
            if child.retired_at is not None:
                if now - child.retired_at > self.configs.get(child.generation, self.cfg).drain_timeout + KILL_GRACE:
                    log.warning("%s still draining past drain_timeout; killing it", child.name)
                    child.abrt_at = now
                    _kill(child.pid, signal.SIGKILL)
                continue
            record = child.region.read_slot(child.slot)
            silent = now - record.heartbeat
            # Booting (imports, TLS material, discovery's first answers) may be slow on a
            # loaded machine without anything being wrong: boot_timeout, not worker_timeout.
            cfg = self.configs.get(child.generation, self.cfg)
            booting = record.state == STATE_BOOTING
            limit = max(cfg.boot_timeout, cfg.worker_timeout) if booting else cfg.worker_timeout
            if silent > limit:
                log.error("%s silent for %.1fs (%s %.1fs); sending ABRT", child.name, silent,
                          "booting: boot_timeout" if booting else "worker_timeout", limit)
                child.abrt_at = now
                _kill(child.pid, signal.SIGABRT)

    def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval
        if interval and time.monotonic() - self.last_watchdog >= interval:
            self.last_watchdog = time.monotonic()
            self.notifier.watchdog()


def _admin_addresses(cfg: Config) -> list[Address]:
    """The control process's sockets: the admin API and the probe listener, if any."""
    probe = cfg.admin.probe_listen
    return [cfg.admin.listen] + ([probe] if probe is not None else [])


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
