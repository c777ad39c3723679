"""mTLS toward a meshed endpoint: the client side of the hop between two meshds.

A request (or an opaque tunnel) to an endpoint that discovery marks meshed goes to the
inbound port of the meshd in front of it. It is mTLS iff this meshd has ``[identity]``
(``ctx.identity``) and discovery gives the endpoint an ``identity`` (its SPIFFE ID);
otherwise plaintext h2c as before. There is no fallback: once TLS is chosen, a failure
is a connect failure.

``MeshTarget`` is the ``TlsTarget`` of such a hop (the HTTP/2 pool and the HTTP/1.1
pool's ``connect`` take either): a handshake with the identity's client context (TLS
1.3, ALPN "h2", our certificate, the peer's chain verified against the published roots,
host names not checked), then the server leaf's SPIFFE URI SAN must equal the endpoint's
``identity``. A handshake that fails, a chain that does not verify or another identity is
an ``UpstreamError`` naming the endpoint, the expected and the presented IDs (a timeout:
``UpstreamTimeout``); the connection is closed. Every outcome is counted on the request's
row (``meshd.shm`` F_TLS_OUT, ``meshd_tls_handshake_total{direction="outbound"}``); the
caller logs the failure as any connect failure (throttled).

Pool keys: ``service`` is ``"mtls <expected identity>"``, so a TLS connection is never
shared with plaintext to the same address, nor with a TLS connection expecting another
identity. Each new handshake asks the identity for its current context (``refresh``):
after a rotation new connections present the new certificate while established ones
keep theirs.
"""

from __future__ import annotations

import socket
import ssl
from typing import TYPE_CHECKING, Any

import gevent

from meshd.errors import ProxyError, UpstreamError, UpstreamTimeout
from meshd.shm import F_TLS_OUT, TLS_RESULTS
from meshd.tls import ALPN_H2, handshake_error
from meshd.worker.identity import WorkerIdentity
from meshd.worker.sockio import address_name, tcp_connect
from meshd.worker.upstream.tls import TlsTarget

if TYPE_CHECKING:
    from meshd.discovery.api import Endpoint
    from meshd.shm import Stripe
    from meshd.worker.context import Context

Address = tuple[str, int]


_NO_ALPN_MEMORY: dict[Address, str] = {}  # a meshed hop always speaks h2: nothing to learn


class MeshTarget(TlsTarget):
    """mTLS to one meshed endpoint expecting ``expected`` (made per request: its
    handshakes are counted on the request's row)."""

    __slots__ = ("identity", "expected", "stripe", "row")

    def __init__(self, identity: WorkerIdentity, expected: str, stripe: Stripe,
                 row: int) -> None:
        # the service is the pool key's part (see the module docstring)
        super().__init__(f"mtls {expected}", None, None, True, _NO_ALPN_MEMORY)
        self.identity = identity
        self.expected = expected
        self.stripe = stripe
        self.row = row

    def handshake(self, sock: socket.socket, address: Address, timeout: float) -> tuple[Any, str]:
        """Wrap the connected ``sock`` (closed on failure): (the TLS socket, "h2")."""
        name = address_name(address)
        try:
            self.identity.refresh()
            context = self.identity.client_context()
        except Exception as e:  # IdentityNotReady: no material loaded (yet)
            sock.close()
            raise self._failed("error", name, f"no workload identity to present: {e}",
                               UpstreamError) from None
        try:
            sock.settimeout(max(timeout, 0.001))
            with gevent.Timeout(max(timeout, 0.001), TimeoutError("handshake timed out")):
                tls = context.wrap_socket(sock)
        except (TimeoutError, gevent.Timeout):
            sock.close()
            raise self._failed("timeout", name, f"not done within {timeout:.3g}s",
                               UpstreamTimeout) from None
        except OSError as e:
            sock.close()
            kind = "verify_failed" if isinstance(e, ssl.SSLCertVerificationError) else "error"
            raise self._failed(kind, name, handshake_error(e), UpstreamError) from None
        presented = WorkerIdentity.peer_id(tls)
        if presented != self.expected:
            tls.close()
            raise self._failed("bad_san", name, f"expected identity {self.expected}, the "
                                                f"server presented {presented or 'none'}",
                               UpstreamError)
        selected = tls.selected_alpn_protocol()
        if selected != ALPN_H2:
            tls.close()
            raise self._failed("error", name, f"ALPN selected {selected or 'nothing'}, not "
                                              "h2", UpstreamError)
        tls.settimeout(None)
        self._count("ok")
        return tls, ALPN_H2

    def connect_h2(self, address: Address, timeout: float) -> Any:
        """A new mTLS connection for the HTTP/2 pool."""
        sock = tcp_connect(address, timeout)
        tls, _ = self.handshake(sock, address, timeout)
        return tls

    def _failed(self, kind: str, name: str, why: str,
                error: type[ProxyError]) -> ProxyError:
        self._count(kind)  # the caller logs the error (throttled), as any connect failure
        return error(f"mTLS to {name} (expecting {self.expected}) failed ({kind}): {why}")

    def _count(self, result: str) -> None:
        self.stripe.add(self.row, F_TLS_OUT + TLS_RESULTS.index(result))


def mesh_target(ctx: Context, ep: Endpoint, row: int) -> MeshTarget | None:
    """The mTLS target of a hop to the meshed endpoint ``ep`` (before its address is
    replaced by the inbound port), None when the hop is plaintext: no ``[identity]``
    here, or no identity given for the endpoint."""
    identity = ctx.identity
    if identity is None or not ep.identity:
        return None
    return MeshTarget(identity, ep.identity, ctx.stripe, row)
