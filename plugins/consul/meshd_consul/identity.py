"""The ``consul`` identity provider: this workload's certificate from Consul's Connect CA,
as Consul's own sidecars get it, and (optionally) Consul intentions as authorization.

```toml
[identity]
provider = "consul"
trust_domain = "consul"                  # Consul names its own (<cluster-uuid>.consul)
service = "web"                          # required: whose leaf certificate to fetch
address = "http://127.0.0.1:8500"        # the local agent, as for [[discovery]] consul
token_file = "/etc/meshd/consul.token"   # a token with service:write on `service`
datacenter = "dc1"                       # optional: the leaf must name this datacenter
intentions = false                       # true: ask /v1/agent/connect/authorize per peer
intentions_fail = "closed"               # "open": allow when the agent cannot answer
authorize_timeout = "1s"                 # one authorize request at most
# TLS to the agent: ca_file, cert_file, key_file, verify; wait, timeout as for discovery
```

What meshd asks the agent (both by blocking query, ``index`` + ``wait``, so a change
reaches meshd at once and nothing is polled while nothing changes):

- ``GET /v1/agent/connect/ca/roots``: every root's ``RootCert`` is trusted (during a CA
  rotation the old and the new one), ``TrustDomain`` is the trust domain the leaf must be
  in; the active root's ``IntermediateCerts`` follow the leaf in the chain.
- ``GET /v1/agent/connect/ca/leaf/<service>``: ``CertPEM`` and ``PrivateKeyPEM``; the
  agent renews the leaf before it expires and re-signs it after a CA rotation.

The two long polls run side by side (two threads; greenlets in meshd's gevent-patched
control process); a change of either yields a new ``Material``. An error (agent
unreachable, 5xx, ACL, a malformed answer) ends ``watch`` with ``ConsulError``: meshd keeps
the last material and restarts the watch with backoff.

``authorize(client_id)``: ``POST /v1/agent/connect/authorize`` with ``Target`` = our
service and ``ClientCertURI`` = the verified peer's SPIFFE ID (``ClientCertSerial`` is
sent empty: meshd hands the provider the identity only, and Consul checks no revocation
list). The agent answers from its cached intentions; with no matching intention, Consul's
ACL default policy decides. A ``400`` (the ID is not a Consul service identity) is a
denial, not an error: ``intentions_fail = "open"`` must never let a foreign identity in.
Transport errors, 5xx and ACL refusals raise: meshd then fails closed (or open).

py-consul (``consul``) has ``agent.connect.ca.roots/leaf`` and ``agent.connect.authorize``
but without ``index``/``wait``, and its ``authorize`` sends ``PUT`` where Consul's
documented method is ``POST``; so its HTTP client is used with the paths written here.
Constructing the class touches no network (it runs in ``meshd check``).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import consul
import requests
from consul.callback import CB
from consul.exceptions import BadRequest
from requests.adapters import HTTPAdapter

from meshd.config import parse_duration
from meshd.errors import ConfigError
from meshd.identity.api import Material, Provider, Settings
from meshd_consul import ConsulError, _cause, _first_line, _go_duration
from meshd_consul.client import Client
from meshd_consul.entries import TokenBucket, next_index
from meshd_consul.options import ConsulOptions, parse_options

__all__ = ["ConsulIdentity", "IdentityOptions", "parse_identity_options"]

ROOTS = "/v1/agent/connect/ca/roots"
LEAF = "/v1/agent/connect/ca/leaf/"
AUTHORIZE = "/v1/agent/connect/authorize"
_SERVICE = re.compile(r"[A-Za-z0-9._-]{1,255}")       # a SPIFFE path segment (the leaf's URI)
_SHARED = ("address", "token_file", "datacenter", "ca_file", "cert_file", "key_file",
           "verify", "wait", "timeout")
_OWN = ("service", "intentions", "intentions_fail", "authorize_timeout")
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+-----END CERTIFICATE-----")


@dataclass(frozen=True, slots=True)
class IdentityOptions:
    agent: ConsulOptions             # address, token, TLS, wait/timeout: as for discovery
    service: str
    intentions: bool = False
    fail_open: bool = False
    authorize_timeout: float = 1.0


def parse_identity_options(options: Mapping[str, Any]) -> IdentityOptions:
    """Validate the ``[identity]`` keys (relative key paths, every problem at once)."""
    problems: list[tuple[str, str]] = []
    for key in options:
        if key not in _SHARED and key not in _OWN:
            problems.append((key, f"unknown key (known: {', '.join(sorted(_SHARED + _OWN))})"))
    agent = ConsulOptions()
    try:
        agent = parse_options({k: v for k, v in options.items() if k in _SHARED})
    except ConfigError as e:
        problems.extend(e.problems)
    service = options.get("service")
    if service is None:
        problems.append(("service", "required: the Consul service whose leaf certificate "
                                    "meshd presents (e.g. \"web\")"))
    elif not isinstance(service, str) or not _SERVICE.fullmatch(service):
        problems.append(("service", f"expected a Consul service name (letters, digits, "
                                    f"'.', '-', '_'), got {service!r}"))
    intentions = options.get("intentions", False)
    if not isinstance(intentions, bool):
        problems.append(("intentions", f"expected true or false, got {intentions!r}"))
    fail = options.get("intentions_fail", "closed")
    if fail not in ("closed", "open"):
        problems.append(("intentions_fail", f'expected "closed" or "open", got {fail!r}'))
    timeout = 1.0
    if "authorize_timeout" in options:
        try:
            timeout = parse_duration(options["authorize_timeout"])
            if not 0.001 <= timeout <= 60.0:
                raise ValueError(f"must be between 0.001s and 60s, got "
                                 f"{options['authorize_timeout']!r}")
        except ValueError as e:
            problems.append(("authorize_timeout", str(e)))
    if problems:
        raise ConfigError(problems)
    return IdentityOptions(agent, str(service), bool(intentions), fail == "open", timeout)


class ConsulIdentity(Provider):
    def __init__(self, options: Mapping[str, Any], settings: Settings) -> None:
        super().__init__(options, settings)
        self.opts = parse_identity_options(options)
        self.fail_open = self.opts.fail_open
        self._lock = threading.Lock()
        self._clients: set[Client] = set()
        self._authz: Client | None = None
        self._closed = False

    # -- certificates --------------------------------------------------------------------

    def watch(self) -> Iterator[Material]:
        feed = _Feed()
        loops = [threading.Thread(target=self._poll, args=(feed, "roots", ROOTS, _roots),
                                  name="consul-identity-roots", daemon=True),
                 threading.Thread(target=self._poll,
                                  args=(feed, "leaf", LEAF + self.opts.service, self._leaf),
                                  name="consul-identity-leaf", daemon=True)]
        for loop in loops:
            loop.start()
        last: Material | None = None
        seen = 0
        try:
            while True:
                seen, values = feed.wait(seen)
                if "roots" in values and "leaf" in values:
                    material = _material(values["roots"], values["leaf"])
                    if material != last:
                        last = material
                        yield material
        finally:
            for client in feed.close():
                self._forget(client)

    def _poll(self, feed: _Feed, what: str, path: str, parse: Callable[[Any], Any]) -> None:
        """One long poll: query, hand the parsed answer to ``feed`` when it changed, again
        with the returned index (Consul's blocking-query rules, rate limited)."""
        client = self._client()
        if not feed.adopt(client):
            self._forget(client)
            return
        o = self.opts.agent
        index = 0
        last: object = None
        bucket = TokenBucket(o.min_interval, now=time.monotonic())
        try:
            while not feed.closed:
                delay = bucket.reserve(time.monotonic())
                if delay and feed.sleep(delay):
                    return
                returned, data = self._get(client, path, index)
                new = next_index(index, returned)
                if new == 0 and index:
                    index = 0          # the index went backwards: a full read, then block
                    continue
                index = new
                value = parse(data)
                if value != last:
                    last = value
                    feed.put(what, value)
        except Exception as e:   # handed to watch(), which raises it (meshd restarts it)
            feed.fail(e)

    def _get(self, client: Client, path: str, index: int) -> tuple[int, Any]:
        what = path.removeprefix("/v1/")
        params: list[tuple[str, Any]] = []
        if index:
            params = [("index", index), ("wait", _go_duration(self.opts.agent.wait))]
        headers = client.prepare_headers(self._token())
        returned, data = self._call(what, lambda: client.http.get(
            CB.json(index=True, allow_404=False), path, params=params, headers=headers))
        try:
            return int(returned), data
        except (TypeError, ValueError):
            raise ConsulError(f"consul {self.opts.agent.agent}: bad X-Consul-Index "
                              f"{returned!r} for {what}") from None

    def _leaf(self, data: Any) -> _Leaf:
        where = f"consul {self.opts.agent.agent}: connect/ca/leaf/{self.opts.service}"
        if not isinstance(data, dict):
            raise ConsulError(f"{where}: expected a JSON object, got {type(data).__name__}")
        cert, key, uri = data.get("CertPEM"), data.get("PrivateKeyPEM"), data.get("ServiceURI")
        if not isinstance(cert, str) or not _PEM_CERT.search(cert.encode()):
            raise ConsulError(f"{where}: no certificate in CertPEM")
        if not isinstance(key, str) or "PRIVATE KEY-----" not in key:
            raise ConsulError(f"{where}: no private key in PrivateKeyPEM")
        dc = self.opts.agent.datacenter
        if dc and isinstance(uri, str) and f"/dc/{dc}/" not in uri:
            raise ConsulError(f"{where}: the leaf is for {uri}, not datacenter {dc!r} "
                              f"(is address the agent of the right datacenter?)")
        return _Leaf(_pem(cert), _pem(key))

    # -- intentions ----------------------------------------------------------------------

    def authorizes(self) -> bool:
        return self.opts.intentions

    def authorize(self, client_id: str) -> bool:
        client = self._authz_client()
        body = json.dumps({"Target": self.opts.service, "ClientCertURI": client_id,
                           "ClientCertSerial": ""})
        headers = client.prepare_headers(self._token())
        headers["Content-Type"] = "application/json"
        try:
            data = self._call("agent/connect/authorize", lambda: client.http.post(
                CB.json(allow_404=False), AUTHORIZE, data=body, headers=headers))
        except _BadRequest:
            return False    # not a Consul service identity (e.g. another trust's SPIFFE ID)
        if not isinstance(data, dict) or not isinstance(data.get("Authorized"), bool):
            raise ConsulError(f"consul {self.opts.agent.agent}: agent/connect/authorize "
                              f"answered without an Authorized boolean")
        return bool(data["Authorized"])

    def _authz_client(self) -> Client:
        client = self._authz
        if client is not None:
            return client
        client = self._new_client(self.opts.authorize_timeout)
        # Many greenlets of a worker ask at once: a pool, not the watch's 2.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=16)
        client.http.session.mount("http://", adapter)
        client.http.session.mount("https://", adapter)
        with self._lock:
            if self._authz is None:
                self._authz = client
            keep = self._authz
        if keep is not client:     # another greenlet made one first
            self._forget(client)
        return keep

    # -- plumbing ------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        where = f"consul {self.opts.agent.agent}"
        try:
            return fn()
        except consul.ACLPermissionDenied as e:
            need = "service:write on " + self.opts.service if "leaf" in what or (
                "authorize" in what) else "a valid token"
            raise ConsulError(f"{where}: ACL denied for {what} (403 {_first_line(e)}; "
                              f"the token needs {need})") from None
        except consul.ACLDisabled as e:
            raise ConsulError(f"{where}: ACL denied for {what} (401 {_first_line(e)})") from None
        except BadRequest as e:
            raise _BadRequest(f"{where}: {what} refused ({_first_line(e)})") from None
        except consul.ConsulException as e:
            raise ConsulError(f"{where}: {what} failed ({_first_line(e)})") from None
        except requests.RequestException as e:
            raise ConsulError(f"{where}: unreachable for {what} ({_cause(e)})") from None

    def _token(self) -> str | None:
        path = self.opts.agent.token_file
        if not path:
            return None
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().strip() or None
        except OSError as e:
            raise ConsulError(f"consul token_file {path}: {e.strerror}") from None

    def _new_client(self, timeout: float) -> Client:
        o = self.opts.agent
        verify: bool | str = (o.ca_file or True) if o.verify else False
        client = Client(host=o.host, port=o.port, scheme=o.scheme, verify=verify,
                        cert=(o.cert_file, o.key_file) if o.cert_file else None,
                        connections_timeout=timeout)
        with self._lock:
            self._clients.add(client)
            closed = self._closed
        if closed:
            client.abort()
        return client

    def _client(self) -> Client:
        return self._new_client(self.opts.agent.timeout)

    def _forget(self, client: Client) -> None:
        with self._lock:
            self._clients.discard(client)
        client.abort()

    def close(self) -> None:
        """Cut every query in flight (a watch then ends with an error; authorize raises)."""
        with self._lock:
            self._closed = True
            clients = list(self._clients)
        for client in clients:
            client.abort()


class _BadRequest(ConsulError):
    """The agent answered 400: the request (an identity) is not one it understands."""


@dataclass(frozen=True, slots=True)
class _Roots:
    trust_domain: str
    roots_pem: bytes
    intermediates_pem: bytes         # of the active root


@dataclass(frozen=True, slots=True)
class _Leaf:
    cert_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:       # never print a key
        return f"_Leaf(cert={len(self.cert_pem)} bytes, key=<hidden>)"


def _roots(data: Any) -> _Roots:
    where = "connect/ca/roots"
    if not isinstance(data, dict) or not isinstance(data.get("Roots"), list):
        raise ConsulError(f"consul: {where}: expected an object with a Roots list")
    trust_domain = data.get("TrustDomain")
    if not isinstance(trust_domain, str) or not trust_domain:
        raise ConsulError(f"consul: {where}: no TrustDomain (is Connect enabled on the agent?)")
    active = data.get("ActiveRootID")
    roots: list[bytes] = []
    intermediates: list[bytes] = []
    for root in data["Roots"]:
        cert = root.get("RootCert") if isinstance(root, dict) else None
        if not isinstance(cert, str) or not _PEM_CERT.search(cert.encode()):
            raise ConsulError(f"consul: {where}: a root without a RootCert certificate")
        roots.append(_pem(cert))
        if root.get("ID") == active or (not active and root.get("Active") is True):
            intermediates = [_pem(c) for c in root.get("IntermediateCerts") or []
                             if isinstance(c, str)]
    if not roots:
        raise ConsulError(f"consul: {where}: no roots (is Connect enabled on the agent?)")
    return _Roots(trust_domain, b"".join(roots), b"".join(intermediates))


def _material(roots: _Roots, leaf: _Leaf) -> Material:
    """The leaf's CertPEM (Consul puts the intermediates it needs after the leaf), then any
    intermediate of the active root not already there."""
    chain = leaf.cert_pem
    have = {m.group(0) for m in _PEM_CERT.finditer(chain)}
    for m in _PEM_CERT.finditer(roots.intermediates_pem):
        if m.group(0) not in have:
            chain += m.group(0) + b"\n"
    return Material(chain, leaf.key_pem, roots.roots_pem, roots.trust_domain)


def _pem(text: str) -> bytes:
    return text.strip().encode() + b"\n"


class _Feed:
    """The latest answer of each long poll, or the first error, for watch() to wait on."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._values: dict[str, Any] = {}
        self._version = 0
        self._error: BaseException | None = None
        self._clients: list[Client] = []
        self.closed = False

    def adopt(self, client: Client) -> bool:
        """Keep ``client`` to cut at close(); False when already closed."""
        with self._cond:
            if self.closed:
                return False
            self._clients.append(client)
            return True

    def put(self, what: str, value: Any) -> None:
        with self._cond:
            self._values[what] = value
            self._version += 1
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            if not self.closed and self._error is None:
                self._error = error
            self._cond.notify_all()

    def wait(self, seen: int) -> tuple[int, dict[str, Any]]:
        """The values once they moved past version ``seen``; raises a loop's error."""
        with self._cond:
            self._cond.wait_for(lambda: self._version != seen or self._error is not None)
            if self._error is not None:
                raise self._error
            return self._version, dict(self._values)

    def sleep(self, seconds: float) -> bool:
        """Wait ``seconds`` (rate limit); True when closed meanwhile."""
        with self._cond:
            return self._cond.wait_for(lambda: self.closed, seconds)

    def close(self) -> list[Client]:
        with self._cond:
            self.closed = True
            clients, self._clients = self._clients, []
            self._cond.notify_all()
        return clients
