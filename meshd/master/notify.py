"""systemd's sd_notify protocol, written by hand: one datagram to $NOTIFY_SOCKET.

Nothing happens when the variable is unset, so the same code runs outside systemd.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("meshd.master")


class Notifier:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is written with a leading "@"; on the wire it starts with NUL.
        self.address = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = env.get("WATCHDOG_USEC", "")
        wd_pid = env.get("WATCHDOG_PID", "")
        self.watchdog_interval: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not wd_pid or wd_pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1_000_000 / 2

    def send(self, *fields: str) -> None:
        if not self.address:
            return
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(message, self.address)
        except OSError as e:  # systemd gone or the socket unwritable: never fatal
            log.warning("sd_notify %s failed: %s", fields, e)

    def ready(self, status: str = "") -> None:
        self.send("READY=1", f"MAINPID={os.getpid()}", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> None:
        self.send("RELOADING=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")


def scrub_env() -> None:
    """Children must not believe the notify socket or the watchdog are theirs."""
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(key, None)
