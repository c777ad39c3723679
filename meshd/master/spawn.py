"""Forking a child (worker or control process) and what the child is handed.

The master imports no gevent, so a child starts from a clean interpreter state: it
resets the master's signal handling, closes what it must not hold, and only then
imports its gevent entry point, which patches the standard library first thing.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass

from meshd.config import Config
from meshd.shm import KIND_WORKER, Region

log = logging.getLogger("meshd.master")

EXIT_BOOT_ERROR = 3

# Debug hook (tests): when set, the master writes ``sorted(sys.modules)`` to this file
# (unless it exists) before it forks a child, so a test can prove what the master had imported by then (the
# children patch with gevent first thing, which must come before anything imports ssl).
MODULES_FILE_ENV = "MESHD_DEBUG_MODULES_FILE"


@dataclass(frozen=True)
class ProcessContext:
    """Everything a child needs; built by the master just before fork."""

    config: Config
    generation: int
    slot: int
    master_pid: int
    region: Region
    sockets: dict[str, socket.socket]     # listen address ("host:port") -> listening socket
    snapshot_path: str                    # written by the control process of this generation
    previous_snapshot_path: str | None    # the previous generation's, to keep shm rows stable


MASTER_ONLY_SIGNALS = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR2)


def fork_child(ctx: ProcessContext, kind: int, close_fds: list[int]) -> int:
    """Fork; in the child run the entry point for ``kind`` and never return."""
    _dump_modules()
    sys.stdout.flush()
    sys.stderr.flush()
    # The child inherits the master's objects (modules, the config) as copy-on-write pages.
    # A collection in the child writes to the header of every object it examines, copying
    # the page: frozen objects are never examined, so the child's collections leave the
    # master's pages shared. Collected first so that no garbage is frozen into the child;
    # the master unfreezes at once, its own collections unchanged.
    gc.collect()
    gc.freeze()
    try:
        pid = os.fork()
    except BaseException:
        gc.unfreeze()
        raise
    if pid:
        gc.unfreeze()
        return pid
    code = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        # The master's own signals are ignored: `systemctl kill -s USR2` (or HUP, TTIN)
        # reaches every process of the unit, and their default action would end a child.
        for sig in MASTER_ONLY_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        signal.set_wakeup_fd(-1)
        for fd in close_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        entry = _entry_point(kind)
        code = entry(ctx) if entry is not None else EXIT_BOOT_ERROR
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        log.exception("child process %d failed", os.getpid())
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _dump_modules() -> None:
    path = os.environ.get(MODULES_FILE_ENV)
    if path and not os.path.exists(path):  # a test removes it to see a later fork
        with open(path, "w") as f:
            f.write("".join(f"{name}\n" for name in sorted(sys.modules)))


def _entry_point(kind: int) -> Callable[[ProcessContext], int] | None:
    """The child's main; None when it cannot be imported (which would fail again on a
    respawn, so the master is told with EXIT_BOOT_ERROR instead)."""
    try:
        if kind == KIND_WORKER:
            from meshd.worker.entry import main
        else:
            from meshd.control.process import main
    except Exception as e:
        log.error("%s %d could not boot: %s: %s", "worker" if kind == KIND_WORKER
                  else "control process", os.getpid(), type(e).__name__, e)
        return None
    return main
