"""Client TLS toward a service's endpoints: the SSL context of ``[service.NAME.tls]``;
server TLS for ordinary clients of a listener: the SSL context of ``[listener.tls]``.

Each function builds its context and is used twice: ``meshd.config`` builds one with the standard
library's class when a config is loaded (``meshd check``, start, reload), so a file
that cannot be read or a certificate that does not load is a config error naming its
key; a worker builds its cooperative one (gevent's class) once per service, on first use
(``meshd.worker.upstream.tls``). No gevent here: the master imports this module.

ALPN: a service with ``protocol = "h2"`` offers only "h2"; any other offers "h2" and
"http/1.1" and the endpoint chooses.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshd.config import TlsConfig
    from meshd.config_identity import ListenerTlsConfig

ALPN_H2 = "h2"
ALPN_HTTP1 = "http/1.1"
# The server side of meshd's TLS (mTLS from peers, [listener.tls]): TLS 1.2 at least, and
# for TLS 1.2 only forward-secret AEAD suites (TLS 1.3 suites are all AEAD and are not
# set by this string). No RSA key exchange, CBC, SHA-1 MACs, RC4, 3DES, NULL or EXPORT.
SERVER_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
SERVER_ALPN = [ALPN_H2, ALPN_HTTP1]


class TlsSetupError(ValueError):
    """A file of a ``[service.NAME.tls]`` table cannot be used; ``key`` names which."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(message)


def alpn_offer(protocol: str) -> list[str]:
    """The ALPN protocols offered to the endpoints of a service speaking ``protocol``."""
    return [ALPN_H2] if protocol == "h2" else [ALPN_H2, ALPN_HTTP1]


def client_context(tls: TlsConfig, protocol: str, context_class: Any = ssl.SSLContext) -> Any:
    """A client SSL context for ``tls`` (an instance of ``context_class``: pass gevent's
    in a worker). Raises ``TlsSetupError`` when a file cannot be read or loaded."""
    ctx = context_class(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.ca_file is not None:
        _readable("ca_file", tls.ca_file)
        try:
            ctx.load_verify_locations(cafile=tls.ca_file)
        except ssl.SSLError as e:
            raise TlsSetupError("ca_file", f"no PEM CA certificate in {tls.ca_file}: "
                                           f"{_ssl_reason(e)}") from None
    elif tls.verify:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.cert_file is not None and tls.key_file is not None:
        _readable("cert_file", tls.cert_file)
        _readable("key_file", tls.key_file)
        try:
            # An encrypted key would make OpenSSL prompt on the terminal: refuse it instead.
            ctx.load_cert_chain(tls.cert_file, tls.key_file, password=_encrypted_key(tls.key_file))
        except ssl.SSLError as e:
            raise TlsSetupError("cert_file", f"cannot load the client certificate {tls.cert_file} "
                                             f"with the key {tls.key_file}: {_ssl_reason(e)}") from None
    ctx.set_alpn_protocols(alpn_offer(protocol))
    return ctx


def harden_server(ctx: Any) -> Any:
    """``ctx`` (a server context) limited to TLS >= 1.2 and SERVER_CIPHERS, offering
    ALPN h2 and http/1.1; returned for chaining."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(SERVER_CIPHERS)
    ctx.set_alpn_protocols(SERVER_ALPN)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


def server_context(tls: ListenerTlsConfig, context_class: Any = ssl.SSLContext) -> Any:
    """The server SSL context of a listener's ``[listener.tls]`` (TLS for ordinary
    clients): its certificate and key, TLS 1.2 at least (``harden_server``), no client
    certificate asked for, ALPN "h2" and "http/1.1". Raises ``TlsSetupError``
    ("cert_file", "key_file") when a file cannot be read or the pair does not load."""
    ctx = harden_server(context_class(ssl.PROTOCOL_TLS_SERVER))
    _readable("cert_file", tls.cert_file)
    _readable("key_file", tls.key_file)
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file, password=_encrypted_key(tls.key_file))
    except ssl.SSLError as e:
        raise TlsSetupError("cert_file", f"cannot load the certificate {tls.cert_file} with the "
                                         f"key {tls.key_file}: {_ssl_reason(e)}") from None
    return ctx


def handshake_error(e: OSError) -> str:
    """A short reason for a failed handshake: the verification message when there is one
    ("certificate verify failed: unable to get local issuer certificate")."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {e.verify_message}"
    if isinstance(e, ssl.SSLError):
        return _ssl_reason(e)
    return e.strerror or str(e)


def _encrypted_key(path: str) -> Any:
    def refuse() -> str:
        raise TlsSetupError("key_file", f"{path} is encrypted; meshd needs an unencrypted "
                                        "key (readable by meshd only)")
    return refuse


def _readable(key: str, path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise TlsSetupError(key, f"cannot read {path}: {e.strerror or e}") from None


def _ssl_reason(e: ssl.SSLError) -> str:
    reason = e.reason or ""
    detail = str(e)
    # "[X509: NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found (_ssl.c:4149)"
    if "] " in detail:
        detail = detail.split("] ", 1)[1]
    detail = detail.split(" (_ssl.c", 1)[0]
    return detail or reason or "invalid"
