"""Opaque TCP proxying: bytes pass through both ways, counted per direction.

Where the platform has ``os.splice`` the bytes go socket -> pipe -> socket inside the
kernel and never enter Python; the greenlet only waits for readiness on the hub.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from typing import TYPE_CHECKING

import gevent
from gevent.socket import wait_read, wait_write

from meshd.errors import ProxyError
from meshd.shm import F_READ_BYTES, F_WRITE_BYTES, ROW_OVERFLOW, Stripe

if TYPE_CHECKING:
    from meshd.config import ListenerConfig
    from meshd.worker.process import Worker

log = logging.getLogger("meshd.worker")

HAS_SPLICE = hasattr(os, "splice")
CHUNK = 1 << 16
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


def serve_tcp(worker: Worker, listener: ListenerConfig, client: socket.socket) -> None:
    service = listener.service or ""
    snap = worker.snapshot
    row = snap.row(listener.name, service)
    row = ROW_OVERFLOW if row is None else row
    endpoints = snap.services.get(service) or ()
    try:
        i, _row = worker.balancer.pick(service, endpoints, snap.endpoint_rows)
        ep = endpoints[i]
        svc = worker.config.services.get(service)
        upstream = worker.pool.connect(ep, svc.connect_timeout if svc else 2.0).sock
    except ProxyError as e:
        log.warning("%s: %s", listener.name, e.reason)
        return
    stripe = worker.stripe
    try:
        back = gevent.spawn(_pump, upstream, client, stripe, row, F_WRITE_BYTES)
        _pump(client, upstream, stripe, row, F_READ_BYTES)
        back.join()
    finally:
        upstream.close()


def _pump(src: socket.socket, dst: socket.socket, stripe: Stripe, row: int, field: int) -> None:
    """Copy src -> dst until EOF, then half-close dst so the peer sees the end too."""
    try:
        if HAS_SPLICE:
            _splice(src, dst, stripe, row, field)
        else:
            while data := src.recv(CHUNK):
                dst.sendall(data)
                stripe.add(row, field, len(data))
    except OSError:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _splice(src: socket.socket, dst: socket.socket, stripe: Stripe, row: int, field: int) -> None:
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    sfd, dfd = src.fileno(), dst.fileno()
    try:
        while True:
            try:
                n = os.splice(sfd, wfd, CHUNK, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                wait_read(sfd)
                continue
            if n == 0:
                return
            stripe.add(row, field, n)
            while n:
                try:
                    n -= os.splice(rfd, dfd, n, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    wait_write(dfd)
                except OSError as e:
                    if e.errno == errno.EAGAIN:
                        wait_write(dfd)
                    else:
                        raise
    finally:
        os.close(rfd)
        os.close(wfd)
