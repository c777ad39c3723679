"""Which TLS an inbound listener terminates: a peer meshd's (its ClientHello offers the
ALPN protocol "meshd"), anything made to the listener's own port, everything on a strict
listener; an application's own TLS that iptables redirected to a permissive listener goes
through untouched."""

from __future__ import annotations

import socket
import ssl
from types import SimpleNamespace
from typing import Any

import gevent
import pytest

from meshd.worker.client.inbound_tls import _from_peer_meshd, terminates_tls
from meshd.worker.identity import ALPN_CLIENT, ALPN_MESH


def client_hello(alpn: list[str]) -> bytes:
    """The first flight of a real TLS client (the standard library's) offering ``alpn``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="app.example")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def ctx(timeout: float = 2.0) -> Any:
    return SimpleNamespace(config=SimpleNamespace(limits=SimpleNamespace(detect_timeout=timeout)))


def peek_verdict(data: bytes, split: bool = False) -> tuple[bool, bytes]:
    """_from_peer_meshd on a socket that received ``data`` (in two writes 50 ms apart
    with ``split``), and what is still there to read afterwards (a peek reads nothing)."""
    a, b = socket.socketpair()
    with a, b:
        if split:
            a.sendall(data[:7])
            gevent.spawn_later(0.05, a.sendall, data[7:])
        else:
            a.sendall(data)
        verdict = _from_peer_meshd(b, ctx())
        b.settimeout(2)
        left = b""
        while len(left) < len(data):
            left += b.recv(65536)
        return verdict, left


def test_a_peer_meshd_offers_the_marker_and_the_server_never_picks_it() -> None:
    assert ALPN_MESH in ALPN_CLIENT and ALPN_CLIENT[0] == "h2"
    hello = client_hello(ALPN_CLIENT)
    assert peek_verdict(hello) == (True, hello)
    assert peek_verdict(hello, split=True) == (True, hello)


@pytest.mark.parametrize("alpn", [["h2", "http/1.1"], ["http/1.1"], []])
def test_an_application_client_does_not(alpn: list[str]) -> None:
    hello = client_hello(alpn)
    assert peek_verdict(hello) == (False, hello)


def test_garbage_and_a_hello_that_never_completes_are_not_a_peer() -> None:
    assert peek_verdict(b"\x16\x03\x01\x00\x05hello")[0] is False
    a, b = socket.socketpair()
    with a, b:
        a.sendall(client_hello(ALPN_CLIENT)[:20])  # the rest never comes
        assert _from_peer_meshd(b, ctx(timeout=0.2)) is False


def test_which_connections_are_terminated() -> None:
    asked: list[int] = []

    def peer(answer: bool):
        def ask() -> bool:
            asked.append(1)
            return answer
        return ask

    # strict, [listener.tls], and connections to the listener's own port: always, unasked
    assert terminates_tls(True, False, True, peer(False))
    assert terminates_tls(False, True, True, peer(False))
    assert terminates_tls(False, False, False, peer(False))
    assert not asked
    # redirected to a permissive listener: only a peer meshd's
    assert terminates_tls(False, False, True, peer(True))
    assert not terminates_tls(False, False, True, peer(False))
    assert len(asked) == 2
