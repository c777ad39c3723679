"""TLS termination on a listener: mTLS from peer meshds (``mtls = "permissive"`` or
``"strict"``) and TLS from ordinary clients (``[listener.tls]``).

The first byte tells (peeked, not read, within ``[limits] detect_timeout``, the wait
detection gives a client to speak first): 0x16 opens a TLS record (a ClientHello), and
the connection is handshaken server-side; anything else is plaintext. One exception,
on a "permissive" listener: a TLS connection iptables redirected here (its original
destination is another port: a client of an HTTPS application in a pod) whose
ClientHello does not offer the ALPN protocol "meshd" (a peer meshd's does:
``meshd.worker.identity.ALPN_MESH``, beside "h2") is the application's own TLS. It goes
through untouched, as opaque TCP, counted as ``plaintext_permitted`` (not meshd's mTLS);
terminating it would hand the application plaintext where it expects TLS. A "strict"
listener terminates every TLS connection (an application's TLS fails there for want of
a client certificate), and so does a connection made to the listener's own port. The handshake as a
whole is bounded by ``[limits] header_read_timeout``: it is the client's first message,
as a request head is, and gets the same bound against a client that trickles it.

- mTLS: this meshd's certificate (``ctx.identity.server_context``, rebuilt by the
  worker's identity when the published material changes, so established connections
  keep theirs and new ones get the new one); the client's certificate is verified
  against the published roots, optional on "permissive" and required on "strict". A
  verified client certificate must carry exactly one SPIFFE URI SAN (``bad_san``
  otherwise), which becomes ``Peer.client_id``.
- ``[listener.tls]``: the listener's certificate, no client certificate.

After the handshake the decrypted stream goes through the listener's usual detection
(``meshd.worker.serve.serve_detected``: HTTP/2 preface, MESHD-TUNNEL, HTTP/1, opaque)
with ``Peer(tls=True, client_id=...)``. Plaintext: on "strict" the connection is closed
without a byte read, counted (``plaintext_refused``) and logged; on "permissive" and
with ``[listener.tls]`` it is served as before, counted (``plaintext_permitted``).

Each outcome is counted on the listener's own row (``meshd.shm`` TLS_RESULTS, F_TLS_IN;
``meshd_tls_handshake_total{direction="inbound"}``); a failed handshake is logged with
its reason ("certificate verify failed: certificate has expired"), throttled per
listener and kind (``meshd.ratelog``). A line names the client's address, the reason
and the listener, never key material.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent
import gevent.ssl

from meshd.proto.detect import client_hello_info
from meshd.ratelog import Throttle
from meshd.shm import DETECT_RESULTS, F_DETECT, F_TLS_IN, ROW_OVERFLOW, TLS_RESULTS
from meshd.tls import TlsSetupError, handshake_error, harden_server, server_context
from meshd.worker.client.tcp import (
    original_destination,
    peer_name,
    redirected_destination,
    serve_opaque,
)
from meshd.worker.identity import ALPN_MESH, WorkerIdentity
from meshd.worker.peer import PLAINTEXT, Peer
from meshd.worker.sockio import shutdown

if TYPE_CHECKING:
    from meshd.config import ListenerConfig
    from meshd.worker.context import Context

log = logging.getLogger("meshd.worker")
# Failed handshakes and refused plaintext are a client's to cause at will: throttled per
# listener and kind. Module state, one per worker process (as the logger it writes to).
_quiet = Throttle(log)

TLS_RECORD_HANDSHAKE = 0x16  # the first byte of a TLS record carrying a ClientHello
HELLO_LIMIT = 5 + 16384      # a TLS record header and the largest record
LINGER_SECONDS = 0.5
LINGER_BYTES = 1 << 20

# A worker's [listener.tls] contexts, by listener name (built on first use; a reload
# starts new workers). The mTLS contexts are the identity's (hardened here on first use:
# meshd.tls.harden_server, SERVER_CIPHERS).
_listener_contexts: dict[str, Any] = {}


def terminates(listener: ListenerConfig) -> bool:
    """Whether connections of ``listener`` go through ``serve_tls_listener``."""
    return listener.tls is not None or listener.mtls != "off"


def serve_tls_listener(ctx: Context, listener: ListenerConfig, client: socket.socket) -> None:
    """Serve ``client`` of a listener that terminates TLS (see the module docstring)."""
    from meshd.worker.serve import serve_detected  # serve imports this module

    strict = listener.mtls == "strict"
    if not strict and listener.opaque_ports:
        dst = original_destination(client)
        if dst is not None and dst[1] in listener.opaque_ports:
            # detection skips it (no byte awaited: a server-first protocol would wait)
            count(ctx, listener, "plaintext_permitted")
            serve_detected(ctx, listener, client, PLAINTEXT)
            return
    first = _peek(client, ctx.config.limits.detect_timeout)
    if first is None:  # the client reset or closed the connection before a byte
        return
    if first and first[0] == TLS_RECORD_HANDSHAKE:
        if terminates_tls(strict, listener.tls is not None,
                          redirected_destination(client) is not None,
                          lambda: _from_peer_meshd(client, ctx)):
            _terminate(ctx, listener, client)
            return
        count(ctx, listener, "plaintext_permitted")  # the application's TLS: passed through
        serve_detected(ctx, listener, client, PLAINTEXT)
        return
    if strict:
        count(ctx, listener, "plaintext_refused")
        _quiet.warning(f"{listener.name}: plaintext refused",
                       "%s: refused a plaintext connection from %s: the listener has "
                       'mtls = "strict" (%s)', listener.name, peer_name(client),
                       "the client sent nothing within detect_timeout" if not first
                       else "the first byte is not a TLS handshake")
        return
    count(ctx, listener, "plaintext_permitted")
    if not first and listener.protocol == "auto":
        # the client waits for the server to speak: what detection would decide after
        # waiting as long again (counted the same)
        ctx.stripe.add(_row(ctx, listener), F_DETECT + DETECT_RESULTS.index("timeout"))
        serve_opaque(ctx, listener, client, b"", None, peer=PLAINTEXT)
        return
    serve_detected(ctx, listener, client, PLAINTEXT)


def _terminate(ctx: Context, listener: ListenerConfig, client: socket.socket) -> None:
    from meshd.worker.serve import serve_detected

    context = _server_context(ctx, listener)
    if context is None:
        return
    who = peer_name(client)
    try:
        tls = context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
    except OSError:  # the client is gone
        return
    try:  # ``client`` is detached now: ``tls`` owns the connection, and is closed here
        peer = _handshake(ctx, listener, tls, who)
        if peer is None:
            return
        tls.settimeout(None)
        serve_detected(ctx, listener, tls, peer)
    finally:
        _close_gracefully(tls)


def _handshake(ctx: Context, listener: ListenerConfig, tls: Any, who: str) -> Peer | None:
    """The handshake within ``header_read_timeout``, its outcome counted: the client's
    Peer, or None (counted and logged) when it failed."""
    limit = ctx.config.limits.header_read_timeout
    try:
        tls.settimeout(limit)
        with gevent.Timeout(limit, TimeoutError("the handshake timed out")):
            tls.do_handshake()
    except (TimeoutError, gevent.Timeout):
        _refused(ctx, listener, "timeout", who, f"not done within {limit:g}s "
                                                "(header_read_timeout)")
        return None
    except OSError as e:
        result = _failure_kind(e)
        _refused(ctx, listener, result, who, handshake_error(e))
        return None
    if listener.mtls == "off":  # [listener.tls]: no client certificate asked
        count(ctx, listener, "ok")
        return Peer(tls=True)
    client_id = ""
    if tls.getpeercert():  # verified (an unverified one fails the handshake)
        client_id = WorkerIdentity.peer_id(tls)
        if not client_id:
            _refused(ctx, listener, "bad_san", who, "the client certificate does not carry "
                                                   "exactly one SPIFFE ID as its URI SAN")
            return None
    count(ctx, listener, "ok")
    return Peer(tls=True, client_id=client_id)


def _failure_kind(e: OSError) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return "verify_failed"
    if isinstance(e, ssl.SSLError) and e.reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE",
                                                    "NO_CERTIFICATE_RETURNED"):
        return "no_client_cert"
    return "error"


def _refused(ctx: Context, listener: ListenerConfig, result: str, who: str, why: str) -> None:
    count(ctx, listener, result)
    _quiet.warning(f"{listener.name}: tls {result}",
                   "%s: TLS handshake from %s refused (%s): %s", listener.name, who,
                   result, why)


def _server_context(ctx: Context, listener: ListenerConfig) -> Any:
    """The listener's server context, None (logged) when there is none to use."""
    if listener.tls is not None:
        found = _listener_contexts.get(listener.name)
        if found is None:
            try:
                found = server_context(listener.tls, gevent.ssl.SSLContext)
            except (TlsSetupError, OSError) as e:
                # the files were checked at load; removed or broken since: tried again next time
                _quiet.warning(f"{listener.name}: tls setup", "%s: TLS cannot be set up: %s",
                               listener.name, e)
                return None
            _listener_contexts[listener.name] = found
        return found
    identity = ctx.identity
    if identity is None or not identity.ready():
        _quiet.warning(f"{listener.name}: no identity",
                       "%s: a TLS connection arrived and this worker has no identity "
                       "material loaded; closing it", listener.name)
        return None
    identity.refresh()
    context = identity.server_context(listener.mtls)
    if not getattr(context, "meshd_hardened", False):  # once per context (a rotation: anew)
        harden_server(context)
        # No TLS 1.3 session tickets: peer meshds never resume (each keeps its connections
        # open instead), and two tickets per handshake cost both ends about a fifth of it.
        context.num_tickets = 0
        context.meshd_hardened = True
    return context


def terminates_tls(strict: bool, listener_tls: bool, redirected: bool,
                   from_peer_meshd: Callable[[], bool]) -> bool:
    """Whether a TLS connection is meshd's to terminate (see the module docstring);
    ``from_peer_meshd`` (a peek at the ClientHello) is asked only when it decides."""
    return strict or listener_tls or not redirected or from_peer_meshd()


def _from_peer_meshd(sock: socket.socket, ctx: Context) -> bool:
    """Whether the ClientHello waiting on ``sock`` (peeked, not read) offers the ALPN
    protocol "meshd". It is awaited whole within ``[limits] detect_timeout``, up to one
    record; one that does not come whole, or does not parse, is not a peer meshd's."""
    deadline = time.monotonic() + ctx.config.limits.detect_timeout
    data = b""
    for _ in range(1000):  # bounded: a peek returns at once while bytes wait
        remaining = deadline - time.monotonic()
        try:
            sock.settimeout(max(remaining, 0.001))
            data = sock.recv(HELLO_LIMIT, socket.MSG_PEEK)
        except OSError:
            return False
        finally:
            try:
                sock.settimeout(None)
            except OSError:
                pass
        whole = len(data) >= 5 and len(data) >= 5 + int.from_bytes(data[3:5], "big")
        if whole or not data or remaining <= 0 or len(data) >= HELLO_LIMIT:
            break
        gevent.sleep(0.005)  # the rest of the record is on its way
    info = client_hello_info(data)
    return info is not None and ALPN_MESH in info.alpn


def _peek(sock: socket.socket, timeout: float) -> bytes | None:
    """The first byte waiting (not read), b"" when none came within ``timeout``, None
    when the client closed or reset the connection first."""
    try:
        sock.settimeout(timeout)
        data = sock.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        return b""
    except OSError:
        return None
    finally:
        try:
            sock.settimeout(None)
        except OSError:
            pass
    return data or None


def _close_gracefully(tls: Any) -> None:
    """As the worker closes a plaintext connection: half-close beneath TLS, read what is
    left (bounded), close; unread bytes would make the kernel reset the connection."""
    shutdown(tls, socket.SHUT_WR)
    deadline = time.monotonic() + LINGER_SECONDS
    left = LINGER_BYTES
    try:
        while left > 0 and (remaining := deadline - time.monotonic()) > 0:
            tls.settimeout(remaining)
            data = tls.recv(65536)
            if not data:
                break
            left -= len(data)
    except (OSError, ValueError):
        pass
    finally:
        tls.close()


def _row(ctx: Context, listener: ListenerConfig) -> int:
    row = ctx.snapshot.row(listener.name, "")
    return ROW_OVERFLOW if row is None else row


def count(ctx: Context, listener: ListenerConfig, result: str) -> None:
    ctx.stripe.add(_row(ctx, listener), F_TLS_IN + TLS_RESULTS.index(result))
