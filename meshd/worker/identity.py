"""A worker's workload identity: the TLS contexts built from what the control process
published (``meshd.control.identity``), rebuilt when it publishes anew.

The control process writes ``roots`` then ``pem`` (chain + key), each renamed into
place, so a new ``pem`` file (its ``(st_mtime_ns, st_ino)``) means new material whose
roots are already out. ``refresh`` is one stat of ``pem`` (about a microsecond, against
a millisecond or more for the handshake it precedes), done before every handshake: a
worker verifies a peer with the newest published roots, so a peer that already
presents a leaf of a rotated CA is not refused for a worker's lag. Never per request. Rebuilt
contexts serve new handshakes; connections already established keep the context they
were made with, so a rotation drops nothing.

Both files are opened once each, owner-checked (``meshd.private_files.open_trusted``:
meshd's own uid, a regular file, writable by no one else, no symbolic link) and read
from the same open file: the certificate and key are loaded by ssl through
``/dev/fd/N`` of the checked descriptor (the standard library's ssl loads a certificate
chain from a path only), the roots from memory (``cadata``). Contexts are gevent's
``SSLContext`` class (cooperative handshakes and reads; no pyOpenSSL in the worker). The
leaf's SPIFFE ID, serial and expiry are read by the standard library too (``_leaf``): a
worker does not import cryptography (about 10 MB of its RSS).

- ``server_context(mode)``: inbound mTLS; TLS 1.2 minimum, our certificate, peers
  verified against the roots: optional ("permissive") or required ("strict"); ALPN
  "h2" and "http/1.1".
- ``client_context()``: toward meshed endpoints; TLS 1.3 minimum, our certificate, the
  server's chain verified against the roots, no host name check (the caller compares
  ``peer_id`` with the endpoint's expected SPIFFE ID), ALPN "h2".
"""

from __future__ import annotations

import _ssl
import datetime
import logging
import os
import ssl
import time
from typing import Any

import gevent.ssl

from meshd.errors import MeshdError
from meshd.identity import IdentityPaths, spiffe
from meshd.private_files import open_trusted
from meshd.ratelog import Throttle

log = logging.getLogger("meshd.worker")

MAX_FILE = 1 << 20
RETRY_FAILED_LOAD = 1.0  # seconds
ALPN_SERVER = ["h2", "http/1.1"]
# A peer meshd offers "meshd" beside "h2": an inbound listener tells a peer's mTLS from an
# application's own TLS by it (the server never selects it: "h2" is in its list first).
ALPN_MESH = "meshd"
ALPN_CLIENT = ["h2", ALPN_MESH]
MODES = ("permissive", "strict")


class IdentityNotReady(MeshdError):
    """No material loaded yet: there is no context to hand out."""

    status = 503
    reason = "workload identity not loaded yet"


class WorkerIdentity:
    """Contexts from the published files of ``paths``; see the module's docstring."""

    def __init__(self, paths: IdentityPaths, trust_domain: str) -> None:
        self.paths = paths
        self.trust_domain = trust_domain
        self.local_id = ""
        self.serial = ""
        self.not_after = 0.0                 # unix seconds; 0 before ready
        self.loads = 0                       # materials loaded, since this worker started
        self.error: str | None = None        # the last failed load, until one succeeds
        self._stamp: tuple[int, int] | None = None
        self._bad_stamp: tuple[int, int] | None = None   # the file a load failed on, and
        self._retry_at = 0.0                              # when to try it again
        self._server: dict[str, Any] = {}
        self._client: Any = None
        self._log = Throttle(log, burst=3, interval=60.0)

    def ready(self) -> bool:
        """Material loaded at least once."""
        return self._client is not None

    def refresh(self) -> None:
        """Reload when the control process published new material (one stat; a rotation
        test saw a worker that looked at most every 0.5 s refuse a peer's new leaf). A
        load that fails keeps the contexts there are (logged, throttled) and is tried
        again at the next refresh."""
        try:
            st = os.stat(self.paths.pem)
        except FileNotFoundError:
            return                           # not published yet
        except OSError as e:
            self._failed(f"{self.paths.pem}: {e.strerror or e}")
            return
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp == self._stamp:
            return
        now = time.monotonic()
        if stamp == self._bad_stamp and now < self._retry_at:
            return  # this file failed to load: tried again once a second, not per handshake
        self._load()
        if self._stamp != stamp and self.error is not None:
            self._bad_stamp, self._retry_at = stamp, now + RETRY_FAILED_LOAD

    def _load(self) -> None:
        # pem first, then roots: the control process writes them the other way round, so
        # the roots read are at least as new as the pem held open (a CA rotation's).
        try:
            fd = open_trusted(self.paths.pem)
        except OSError as e:
            self._failed(_os_error(e))
            return
        try:
            roots = _read_trusted(self.paths.roots)
        except OSError as e:
            os.close(fd)
            self._failed(_os_error(e))
            return
        try:
            st = os.fstat(fd)
            pem = _read_fd(fd)   # bounded: a file too large is refused here
            # The same open file, through /dev/fd: what was checked is what ssl loads.
            chain = f"/dev/fd/{fd}"
            local_id, serial, not_after = _leaf(chain, pem)
            if not local_id:
                raise ValueError("the published leaf has no single SPIFFE URI SAN")
            cadata = roots.decode("ascii")
            server = {mode: _server_context(chain, cadata, mode) for mode in MODES}
            client = _client_context(chain, cadata)
        except (OSError, ValueError, ssl.SSLError) as e:
            self._failed(f"{self.paths.pem}: {type(e).__name__}: {e}")
            return
        finally:
            os.close(fd)
        self._server, self._client = server, client
        self._stamp = (st.st_mtime_ns, st.st_ino)   # of what was loaded: a newer one reloads
        self.local_id = local_id
        self.serial = serial
        self.not_after = not_after
        self.loads += 1
        self.error = None
        expires = datetime.datetime.fromtimestamp(not_after, datetime.UTC)
        log.info("identity: worker %d loaded %s (serial %s, expires %s)", os.getpid(), local_id,
                 self.serial, expires.isoformat(timespec="seconds"))

    def _failed(self, why: str) -> None:
        self.error = why
        self._log.log(logging.ERROR, "identity load", "identity: worker %d cannot load the "
                      "published material: %s; %s", os.getpid(), why,
                      f"keeping {self.local_id}" if self.ready() else "no identity yet")

    def server_context(self, mode: str) -> Any:
        """The server context for inbound mTLS, ``mode`` "permissive" or "strict"."""
        ctx = self._server.get(mode)
        if ctx is None:
            if mode not in MODES:
                raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
            raise IdentityNotReady()
        return ctx

    def client_context(self) -> Any:
        """The client context toward meshed endpoints."""
        if self._client is None:
            raise IdentityNotReady()
        return self._client

    @staticmethod
    def peer_id(tls_sock: Any) -> str:
        """The SPIFFE ID of the peer's verified leaf (its one URI SAN), or "" (no
        certificate, not verified, or no single valid SPIFFE URI SAN)."""
        try:
            cert = tls_sock.getpeercert()    # {} unless the chain was verified
        except (ValueError, OSError):
            return ""
        if not cert:
            return ""
        uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]
        if len(uris) != 1 or spiffe.problem(uris[0]):
            return ""
        return str(uris[0])

    def expires_in(self) -> float:
        """Seconds until the loaded leaf expires (negative once expired)."""
        return self.not_after - datetime.datetime.now(datetime.UTC).timestamp()


def _server_context(chain: str, cadata: str, mode: str) -> Any:
    ctx = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(chain)
    ctx.load_verify_locations(cadata=cadata)
    ctx.verify_mode = ssl.CERT_REQUIRED if mode == "strict" else ssl.CERT_OPTIONAL
    ctx.set_alpn_protocols(ALPN_SERVER)
    return ctx


def _client_context(chain: str, cadata: str) -> Any:
    ctx = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False           # the SPIFFE ID is compared instead (peer_id)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(chain)
    ctx.load_verify_locations(cadata=cadata)
    ctx.set_alpn_protocols(ALPN_CLIENT)
    return ctx


def _os_error(e: OSError) -> str:
    if e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e)   # UntrustedFile: its message names the file and the reason


def _read_fd(fd: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size <= MAX_FILE:
        chunk = os.pread(fd, 65536, size)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
    raise ValueError(f"larger than {MAX_FILE} bytes")


def _read_trusted(path: str) -> bytes:
    fd = open_trusted(path)
    try:
        return _read_fd(fd)
    finally:
        os.close(fd)


def _leaf(path: str, pem: bytes) -> tuple[str, str, float]:
    """(its SPIFFE ID, its one valid SPIFFE URI SAN or ""; its serial number in hex; its
    expiry in unix seconds) of the leaf, the first certificate in the file ``path``
    (whose content is ``pem``).

    The standard library decodes it: ``_ssl._test_decode_cert`` gives for a file what
    ``getpeercert()`` gives for a peer (private, but in every Python from 3.6 to 3.13). A
    worker that imported ``cryptography`` instead would hold its Rust extension, about
    10 MB of its RSS (docs/perf/memory.md); the control process has checked the material
    with it already. An interpreter without that function falls back to cryptography."""
    decode = getattr(_ssl, "_test_decode_cert", None)
    if decode is None:
        return _leaf_cryptography(pem)
    cert = decode(path)
    serial, not_after = cert.get("serialNumber"), cert.get("notAfter")
    if not isinstance(serial, str) or not isinstance(not_after, str):
        raise ValueError("the published leaf has no serial number or no expiry")
    uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]
    local_id = uris[0] if len(uris) == 1 and not spiffe.problem(uris[0]) else ""
    return str(local_id), f"{int(serial, 16):x}", float(ssl.cert_time_to_seconds(not_after))


def _leaf_cryptography(pem: bytes) -> tuple[str, str, float]:
    from cryptography import x509

    leaf = x509.load_pem_x509_certificate(pem)
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    local_id = uris[0] if len(uris) == 1 and not spiffe.problem(uris[0]) else ""
    return local_id, f"{leaf.serial_number:x}", leaf.not_valid_after_utc.timestamp()
