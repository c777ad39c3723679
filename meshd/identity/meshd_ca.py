"""The ``meshd-ca`` identity provider: leaf certificates issued in memory from a lab CA
directory (``meshd ca init``), renewed before they expire, following a CA rotation.

```toml
[identity]
provider = "meshd-ca"
trust_domain = "lab.example"
dir = "/etc/meshd/ca"          # made by `meshd ca init --dir ... --trust-domain lab.example`
service = "web"                # outside Kubernetes: spiffe://lab.example/service/web
# identity = "spiffe://lab.example/service/web"   # or the SPIFFE ID itself
# service_account = "web"      # in Kubernetes (else env MESHD_SERVICE_ACCOUNT, then
#                              # POD_SERVICE_ACCOUNT, which `meshd inject` sets):
#                              # spiffe://TD/ns/<pod namespace>/sa/web
ttl = "24h"                    # each leaf's lifetime (at least 1m)
renew_at = 0.6667              # issue the next leaf after this fraction of a lifetime
```

Which identity: ``identity`` when given; else in Kubernetes (``KUBERNETES_SERVICE_HOST``
set and the service-account namespace file readable) ``spiffe://TD/ns/NS/sa/SA``, SA from
``service_account``, else ``MESHD_SERVICE_ACCOUNT``, else ``POD_SERVICE_ACCOUNT`` (set by
``meshd inject``); elsewhere ``spiffe://TD/service/NAME``
from ``service``. The CA directory is checked at construction (``meshd check``, start,
reload): ``ca.key`` 0600 and this uid's, ``ca.crt`` holding the certificate of that key,
a CA for ``[identity] trust_domain``. Errors carry key paths relative to ``[identity]``.

``watch`` issues a leaf (fresh key, never written to disk) and yields it with every root of
``ca.crt``; then sleeps (cooperatively: the control process is gevent-patched) until
``renew_at`` of the leaf's lifetime, polling ``ca.crt``/``ca.key`` every few seconds. A
changed CA directory is re-read and a leaf issued from it at once, so a rotation (a new
root appended to ``ca.crt``, its key in ``ca.key``) reaches peers: they trust every root
in the file. A CA directory that does not load meanwhile is logged and the CA in memory
stays. A CA that has expired ends ``watch`` with an error (meshd logs it and retries
with backoff; the last good leaf serves until it expires).
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from meshd.config_table import Problems, Table, duration, string
from meshd.errors import ConfigError
from meshd.identity import spiffe
from meshd.identity.api import Material, Provider, Settings

if TYPE_CHECKING:
    from meshd.identity import ca_dir

# ca and ca_dir (cryptography: about 10 MB of RSS) are imported where a CA is read or a leaf
# issued, not here: a worker imports this module only to see that the class never
# authorizes (meshd.worker.authorize.load_provider), and must not hold cryptography for it.

log = logging.getLogger("meshd.identity")

NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
DEFAULT_TTL = "24h"
MIN_TTL = 60.0
MAX_TTL = 365 * 24 * 3600.0
DEFAULT_RENEW_AT = 2 / 3
MIN_RENEW_DELAY = 1.0     # however short a leaf's life (a CA about to expire), no busy loop


class CaExpired(Exception):
    """The CA directory's signing certificate is not valid now: no leaf can be issued."""


class MeshdCaProvider(Provider):
    """Leaf certificates from a ``meshd ca`` directory (see the module docstring)."""

    poll_interval = 5.0   # seconds between looks at ca.crt/ca.key while waiting to renew

    def __init__(self, options: Mapping[str, Any], settings: Settings, *,
                 environ: Mapping[str, str] | None = None,
                 namespace_file: str = NAMESPACE_FILE,
                 now: Callable[[], datetime.datetime] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__(options, settings)
        self._now = now or (lambda: datetime.datetime.now(datetime.UTC))
        self._sleep = sleep
        environ = os.environ if environ is None else environ
        problems: Problems = []
        t = Table(options, "", problems)
        self.dir = t.take("dir", string(), "", required=True)
        identity = t.take("identity", string(), "")
        service = t.take("service", string(), "")
        account = t.take("service_account", string(), "")
        self.ttl = t.take("ttl", _ttl, _ttl(DEFAULT_TTL))
        self.renew_at = t.take("renew_at", _fraction, DEFAULT_RENEW_AT)
        t.finish()
        td = settings.trust_domain
        if self.dir and "dir" not in t.bad:
            from meshd.identity import ca_dir
            try:
                authority = ca_dir.load(self.dir)
            except ca_dir.CaDirError as e:
                problems.append(("dir", str(e)))
            else:
                if authority.trust_domain != td:
                    problems.append(("dir", f"the CA in {self.dir} is for trust domain "
                                            f"{authority.trust_domain!r}, [identity] "
                                            f"trust_domain is {td!r}"))
        self.identity = self._identity(identity, service, account, environ, namespace_file,
                                       t.bad, problems)
        if problems:
            raise ConfigError(problems)

    def _identity(self, identity: str, service: str, account: str,
                  environ: Mapping[str, str], namespace_file: str, bad: set[str],
                  problems: Problems) -> str:
        td = self.settings.trust_domain
        if identity:
            if service:
                problems.append(("service", "give identity or service, not both"))
            problem = spiffe.problem(identity)
            if problem:
                problems.append(("identity", problem))
            elif spiffe.trust_domain(identity) != td:
                problems.append(("identity", f"{identity} is not in [identity] trust_domain "
                                             f"{td!r}"))
            return identity
        if bad & {"identity", "service", "service_account"}:
            return ""
        namespace = _namespace(environ, namespace_file)
        if namespace:
            # POD_SERVICE_ACCOUNT: what `meshd inject` sets from the downward API
            account = (account or environ.get("MESHD_SERVICE_ACCOUNT", "")
                       or environ.get("POD_SERVICE_ACCOUNT", ""))
            if not account:
                problems.append(("service_account", "required in Kubernetes (or the env "
                                 "MESHD_SERVICE_ACCOUNT or POD_SERVICE_ACCOUNT): the identity is "
                                 f"spiffe://{td}/ns/{namespace}/sa/SERVICE-ACCOUNT"))
                return ""
            value = spiffe.for_service_account(td, namespace, account)
            key = "service_account"
        else:
            if not service:
                problems.append(("service", "required outside Kubernetes (or give identity): "
                                 f"the identity is spiffe://{td}/service/NAME"))
                return ""
            value = spiffe.for_service(td, service)
            key = "service"
        problem = spiffe.problem(value)
        if problem:
            problems.append((key, problem))
        return value

    def watch(self) -> Iterator[Material]:
        from meshd.identity import ca as ca_mod
        from meshd.identity import ca_dir
        seen = ca_dir.stamp(self.dir)    # before reading: a change meanwhile is seen next
        authority = self._load()
        while True:
            now = self._now()
            if not authority.not_before <= now < authority.not_after:
                raise CaExpired(f"the CA in {self.dir} is valid from {authority.not_before} "
                                f"to {authority.not_after}, not now: no leaf can be issued")
            leaf = ca_mod.issue(authority.signing, self.identity, ttl=self.ttl, now=now)
            not_after = _not_after(leaf.cert_pem)
            delay = max(MIN_RENEW_DELAY, (not_after - now).total_seconds() * self.renew_at)
            renew = now + datetime.timedelta(seconds=delay)
            log.info("meshd-ca: issued %s from %s, valid until %s; next at %s",
                     self.identity, self.dir, f"{not_after:%Y-%m-%d %H:%M:%S}",
                     f"{renew:%Y-%m-%d %H:%M:%S}")
            yield Material(chain_pem=leaf.cert_pem + authority.signing.cert_pem,
                           key_pem=leaf.key_pem, roots_pem=authority.roots_pem,
                           trust_domain=authority.trust_domain)
            while (left := (renew - self._now()).total_seconds()) > 0:
                self._sleep(min(self.poll_interval, left))
                stamp = ca_dir.stamp(self.dir)
                if stamp == seen:
                    continue
                seen = stamp
                try:
                    authority = self._load()
                except ca_dir.CaDirError as e:
                    log.warning("meshd-ca: the CA directory changed and does not load; "
                                "the CA in memory stays: %s", e)
                    continue
                log.info("meshd-ca: the CA in %s changed (%d roots); issuing from it",
                         self.dir, authority.roots_pem.count(b"-----BEGIN CERTIFICATE-----"))
                break

    def _load(self) -> ca_dir.CaDir:
        from meshd.identity import ca_dir
        authority = ca_dir.load(self.dir)
        if authority.trust_domain != self.settings.trust_domain:
            raise ca_dir.CaDirError(f"the CA in {self.dir} is now for trust domain "
                                    f"{authority.trust_domain!r}, not "
                                    f"{self.settings.trust_domain!r}")
        return authority


def _namespace(environ: Mapping[str, str], path: str) -> str:
    """The pod's namespace when running in Kubernetes, else ""."""
    if not environ.get("KUBERNETES_SERVICE_HOST"):
        return ""
    try:
        with open(path, "rb") as f:
            return f.read(256).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _ttl(value: object) -> float:
    seconds = duration(MIN_TTL)(value)
    if seconds > MAX_TTL:
        raise ValueError(f"must be at most {MAX_TTL / 3600:g}h, got {value!r}")
    return seconds


def _fraction(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a fraction of the lifetime like 0.67, got {value!r}")
    if not 0.01 <= value <= 0.99:
        raise ValueError(f"must be between 0.01 and 0.99, got {value}")
    return float(value)


def _not_after(cert_pem: bytes) -> datetime.datetime:
    from cryptography import x509
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc
