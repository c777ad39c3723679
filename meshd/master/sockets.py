"""Listening sockets: bound once by the master, before any fork, or inherited.

Sockets come from three places, in this order: systemd socket activation
(``LISTEN_FDS``/``LISTEN_PID``, fds from 3), a previous master during a binary upgrade
(``MESHD_FDS``, a comma-separated fd list), or ``bind``. Inherited sockets are matched to
the config's listeners by their bound address, so unit files and configs agree by
address, not by order.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

from meshd.config import Address
from meshd.errors import MeshdError

log = logging.getLogger("meshd.master")

SD_LISTEN_FDS_START = 3
UPGRADE_ENV = "MESHD_FDS"


def address_key(addr: Address) -> str:
    return str(addr)


def bind(addr: Address, backlog: int) -> socket.socket:
    infos = socket.getaddrinfo(addr.host, addr.port, addr.family, socket.SOCK_STREAM,
                               0, socket.AI_PASSIVE)
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise MeshdError(f"cannot listen on {addr}: {e.strerror}") from None
    sock.setblocking(False)
    return sock


def sockname_key(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


def inherited(environ: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """Sockets handed down by systemd or by the master we upgrade from (env is cleared)."""
    env: MutableMapping[str, str] = os.environ if environ is None else environ
    fds: list[int] = []
    if env.get("LISTEN_PID") == str(os.getpid()) and env.get("LISTEN_FDS", "").isdigit():
        fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(env["LISTEN_FDS"])))
    elif env.get(UPGRADE_ENV):
        fds = [int(fd) for fd in env[UPGRADE_ENV].split(",") if fd.strip().isdigit()]
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", UPGRADE_ENV):
        env.pop(key, None)
    socks = []
    for fd in fds:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            log.warning("inherited fd %d is not a socket (%s); ignored", fd, e)
            continue
        if sock.type != socket.SOCK_STREAM:
            log.warning("inherited fd %d is not a stream socket; ignored", fd)
            sock.detach()
            continue
        os.set_inheritable(fd, False)
        sock.setblocking(False)
        socks.append(sock)
    return socks


class SocketSet:
    """The master's listening sockets, by address. Survives reloads: an address that stays
    in the config keeps its socket, so no connection in the accept queue is lost."""

    def __init__(self) -> None:
        self.by_address: dict[str, socket.socket] = {}

    def adopt(self, socks: list[socket.socket]) -> None:
        for sock in socks:
            key = sockname_key(sock)
            self.by_address[key] = sock
            log.info("inherited listening socket %s (fd %d)", key, sock.fileno())

    def ensure(self, addrs: list[tuple[Address, int]]) -> dict[str, socket.socket]:
        """Sockets for these (address, backlog) pairs, binding the ones not yet open.
        On failure nothing new stays open and the error says which address."""
        fresh: dict[str, socket.socket] = {}
        try:
            for addr, backlog in addrs:
                key = address_key(addr)
                if key in self.by_address or key in fresh:
                    continue
                sock = bind(addr, backlog)
                fresh[key] = sock
        except MeshdError:
            for sock in fresh.values():
                sock.close()
            raise
        self.by_address.update(fresh)
        return {address_key(a): self.by_address[address_key(a)] for a, _ in addrs
                if address_key(a) in self.by_address}

    def close_unused(self, keep: set[str]) -> None:
        for key in list(self.by_address):
            if key not in keep:
                log.info("closing listening socket %s", key)
                self.by_address.pop(key).close()

    def close_all(self) -> None:
        self.close_unused(set())

    def fds_for_exec(self) -> str:
        """Mark every socket inheritable and name their fds for a new master."""
        fds = []
        for sock in self.by_address.values():
            os.set_inheritable(sock.fileno(), True)
            fds.append(str(sock.fileno()))
        return ",".join(fds)
