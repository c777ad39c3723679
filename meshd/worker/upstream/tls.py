"""TLS toward a service's endpoints (``[service.NAME.tls]``), for one worker.

``UpstreamTls`` keeps one ``TlsTarget`` per service, built on first use and kept for
the worker's life (a reload starts new workers): its cooperative SSL context
(``meshd.tls.client_context`` with gevent's class, so handshakes and reads wait on the
hub), the name to send as SNI and verify, and the handshake itself, whose failures are
connect failures (``UpstreamError`` naming the endpoint and the TLS error;
``UpstreamTimeout`` for a handshake that outlives the connect timeout).

``alpn`` remembers, per endpoint address, what ALPN selected on the latest connection
that told something ("h2" or "http/1.1"; no ALPN at all counts as "http/1.1"), so a
request goes straight to the HTTP/2 pool or the HTTP/1.1 one; every new connection
refreshes it. A connection that offered only "h2" (``protocol = "h2"``) and got none
tells nothing about what the endpoint would pick from both, so it is not remembered.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

import gevent.ssl

from meshd.errors import (
    ProtocolUnavailable,
    UpstreamError,
    UpstreamSetupError,
    UpstreamTimeout,
)
from meshd.tls import ALPN_H2, ALPN_HTTP1, TlsSetupError, client_context, handshake_error
from meshd.worker.sockio import address_name as _name
from meshd.worker.sockio import tcp_connect

if TYPE_CHECKING:
    from meshd.config import Config

Address = tuple[str, int]


class TlsTarget:
    """How one service's endpoints are reached over TLS."""

    __slots__ = ("service", "context", "server_name", "require_h2", "alpn")

    def __init__(self, service: str, context: Any, server_name: str | None, require_h2: bool,
                 alpn: dict[Address, str]) -> None:
        self.service = service
        self.context = context
        self.server_name = server_name  # None: the endpoint's host (an IP: its IP SAN)
        self.require_h2 = require_h2    # protocol = "h2": only "h2" is offered
        self.alpn = alpn                # the worker's memory, shared by every target

    def handshake(self, sock: socket.socket, address: Address, timeout: float) -> tuple[Any, str]:
        """Wrap the connected ``sock`` (closed on failure): (the TLS socket, the protocol
        ALPN selected, "http/1.1" when none). With ``require_h2`` anything but "h2" fails."""
        name = _name(address)
        try:
            sock.settimeout(max(timeout, 0.001))
            tls = self.context.wrap_socket(sock, server_hostname=self.server_name or address[0])
        except TimeoutError:
            sock.close()
            raise UpstreamTimeout(f"TLS handshake with {name} timed out") from None
        except OSError as e:
            sock.close()
            raise UpstreamError(f"TLS handshake with {name} failed: {handshake_error(e)}") from None
        selected = tls.selected_alpn_protocol()
        if selected or not self.require_h2:
            self.alpn[address] = ALPN_H2 if selected == ALPN_H2 else ALPN_HTTP1
        if self.require_h2 and selected != ALPN_H2:
            tls.close()
            raise UpstreamError(f"{name} did not select ALPN h2 (it selected "
                                f"{selected or 'none'}); service {self.service} has "
                                'protocol = "h2"')
        tls.settimeout(None)
        return tls, selected or ALPN_HTTP1

    def connect_h2(self, address: Address, timeout: float) -> Any:
        """A new TLS connection on which ALPN selected "h2" (for the HTTP/2 pool). An
        endpoint that selects http/1.1 raises ``ProtocolUnavailable``: it is healthy,
        and remembered, so later requests go to the HTTP/1.1 pool."""
        sock = tcp_connect(address, timeout)
        tls, selected = self.handshake(sock, address, timeout)
        if selected != ALPN_H2:
            tls.close()
            raise ProtocolUnavailable(f"HTTP/2 needed, and {_name(address)} selected ALPN "
                                      f"{selected} over TLS")
        return tls


class UpstreamTls:
    """A worker's TLS targets (one per service with TLS) and its ALPN memory."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.alpn: dict[Address, str] = {}
        self._targets: dict[str, TlsTarget] = {}

    def target(self, service: str) -> TlsTarget | None:
        """The TLS target of ``service``, None when it speaks plaintext. A context that
        cannot be built now (a file removed since the config was loaded) fails the
        attempt (``UpstreamSetupError``, not counted against the endpoint) and is tried
        again by the next request."""
        found = self._targets.get(service)
        if found is not None:
            return found
        svc = self.config.services.get(service)
        if svc is None or svc.tls is None:
            return None
        try:
            context = client_context(svc.tls, svc.protocol, gevent.ssl.SSLContext)
        except (TlsSetupError, OSError) as e:
            raise UpstreamSetupError(f"TLS toward service {service} cannot be set up: "
                                     f"{e}") from None
        target = TlsTarget(service, context, svc.tls.server_name, svc.protocol == "h2",
                           self.alpn)
        self._targets[service] = target
        return target
