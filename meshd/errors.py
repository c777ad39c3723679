"""The one error tree of meshd.

Every error says what it means on the wire: ``status`` is the HTTP status a proxy
answers with when the error ends a request, ``reason`` the one-line text of that answer.
Config problems carry their key paths so a user finds the line to fix.
"""

from __future__ import annotations


class MeshdError(Exception):
    """Base of every error meshd raises on purpose."""

    status = 500
    reason = "internal error"

    def __init__(self, reason: str | None = None) -> None:
        if reason is not None:
            self.reason = reason
        super().__init__(self.reason)


class ConfigError(MeshdError):
    """A config (file or reload) is invalid. ``problems`` holds (key path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]], path: str = "") -> None:
        self.problems = list(problems)
        self.path = path
        super().__init__("; ".join(f"{k}: {m}" if k else m for k, m in self.problems))

    def lines(self) -> list[str]:
        """One ``FILE: key.path: what is wrong`` line per problem (the format of `meshd check`)."""
        prefix = f"{self.path}: " if self.path else ""
        return [f"{prefix}{k}: {m}" if k else f"{prefix}{m}" for k, m in self.problems]


class PluginError(MeshdError):
    """A plugin (discovery backend, identity provider) could not be found, imported or
    configured."""


class PluginImportError(PluginError):
    """A plugin is installed but raises when imported: `meshd check`, `meshd run`
    and a reload (HUP) all refuse the config (exit 2, or the old config keeps serving)."""


class ShmError(MeshdError):
    """The shared-memory region cannot be created or attached (wrong magic, version, size)."""


class ProxyError(MeshdError):
    """An error that ends one proxied request with an HTTP answer. ``endpoint_fault``:
    a failed connection attempt counts toward the endpoint's failure accrual."""

    status = 502
    reason = "bad gateway"
    endpoint_fault = True


class BadRequest(ProxyError):
    status = 400
    reason = "malformed request"


class UriTooLong(BadRequest):
    status = 414
    reason = "request line too long"


class HeadersTooLarge(BadRequest):
    status = 431
    reason = "request header fields too large"


class Forbidden(ProxyError):
    """An authorization policy (or the identity provider) refuses the client's identity:
    the request never reaches the application. The reason is all the client learns."""
    status = 403
    reason = "forbidden: client identity not allowed"
    endpoint_fault = False


class NoRoute(ProxyError):
    """The service's fleet routes (a Gateway API HTTPRoute attached to it) match none of
    the request's: GAMMA says such a request is rejected with a 404."""
    status = 404
    reason = "no route matches"


class RequestTimeout(ProxyError):
    status = 408
    reason = "request header read timed out"


class NotImplementedByProxy(ProxyError):
    status = 501
    reason = "not implemented"


class NoService(ProxyError):
    status = 503
    reason = "unknown service"


class NoEndpoints(ProxyError):
    status = 503
    reason = "no endpoints"


class EndpointsBusy(ProxyError):
    """Every endpoint is at its max_pending or max_connections limit: answered at once
    rather than queued."""
    status = 503
    reason = "endpoints busy"


class UpstreamError(ProxyError):
    status = 502
    reason = "upstream failure"


class ProtocolUnavailable(UpstreamError):
    """The endpoint is up but cannot speak what the request needs (a gRPC request to a
    TLS endpoint whose ALPN selected http/1.1): not counted against the endpoint, and
    the request may go to another one."""

    endpoint_fault = False


class UpstreamSetupError(UpstreamError):
    """meshd cannot set up its side of a connection (a service's TLS files cannot be
    loaded any more): answered 502, not counted against the endpoint."""

    endpoint_fault = False


class NotSent(UpstreamError):
    """Nothing of the request reached the upstream: the write of its first bytes failed
    (the connection was reset or closed before the kernel took any), or the connection
    failed before it was written. As safe to send again as a refused stream, whatever
    the method."""
    reason = "write failed before sending"


class StreamRefused(UpstreamError):
    """An HTTP/2 upstream refused the stream (RST_STREAM REFUSED_STREAM, or a stream
    beyond the last stream id of its GOAWAY): it did not process it (RFC 9113 §6.8,
    §8.7), so it may be sent again whatever the method. Not the endpoint's failure."""
    reason = "stream refused by the upstream"
    endpoint_fault = False


class UpstreamTimeout(ProxyError):
    status = 504
    reason = "upstream timeout"


class PeerSilent(UpstreamTimeout):
    """An HTTP/2 upstream answered no PING in time while streams waited on it: the
    connection takes no new streams, and a waiting stream that may be retried is
    abandoned (sent again elsewhere)."""
    reason = "upstream silent (no PING answer)"
