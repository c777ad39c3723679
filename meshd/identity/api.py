"""The identity provider contract (API version 1).

A provider is a class published by a distribution under the entry-point group
``meshd.identity``; the entry point's name is what ``[identity] provider = "..."`` picks
(``meshd.identity.registry``). meshd constructs it as ``Provider(options, settings)``:
``options`` are the ``[identity]`` keys other than ``provider`` and ``trust_domain``,
``settings`` what meshd knows (``Settings``). ``__init__`` validates ``options`` and raises
``meshd.errors.ConfigError`` with key paths relative to ``[identity]`` (``("cert_file",
"required")``); it runs at start, in ``meshd check`` and on every reload, in a child
process, so it must not block (no network).

In the control process (gevent-patched: blocking calls are cooperative) meshd iterates
``watch()`` in a greenlet. It yields a ``Material`` as soon as it has one and a new one
each time the certificate, key or roots change (a rotation). meshd checks each one
(``meshd.identity.material``) before publishing it: the key matches the leaf, the leaf has
one SPIFFE URI SAN in the trust domain, it is valid now. A refused one is logged and the
last good material stays. A ``watch`` that raises is logged with the plugin's
distribution and restarted with backoff; the last good material stays in use meanwhile
(fail static) until it expires.

Optional: ``authorize(client_id)``. When a provider has it and ``authorizes()`` returns
True, inbound listeners ask it (in the worker, gevent-patched, through a bounded cache
kept by meshd) whether the peer ``client_id`` (a SPIFFE ID) may call this workload, in
addition to any ``[[authorization]]`` policy. Return True or False; raise to say "cannot
tell" (meshd then fails closed, or open when the provider says so in ``fail_open``).
The worker constructs its own instance of the class (``__init__`` again, never
``watch``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

API_VERSION = 1


@dataclass(frozen=True, slots=True)
class Settings:
    """What meshd hands a provider besides its own options."""

    trust_domain: str            # [identity] trust_domain
    instance: str                # the config's instance name
    state_dir: str               # meshd's state directory (a provider may keep files there)


@dataclass(frozen=True, slots=True)
class Material:
    """One certificate, its key and the roots to verify peers with, as PEM bytes.

    ``chain_pem``: the leaf first, then intermediates (what a peer needs to reach a root);
    ``key_pem``: the leaf's private key, unencrypted (PKCS#8 or traditional);
    ``roots_pem``: one or more trust anchors (during a CA rotation: old and new).
    ``trust_domain``: the trust domain the leaf must be in; "" means ``[identity]
    trust_domain`` (a provider whose CA names its own, as Consul's does, gives it here)."""

    chain_pem: bytes
    key_pem: bytes
    roots_pem: bytes
    trust_domain: str = ""

    def __repr__(self) -> str:  # never print a key (logs, tracebacks)
        return (f"Material(chain={len(self.chain_pem)} bytes, key=<hidden>, "
                f"roots={len(self.roots_pem)} bytes, trust_domain={self.trust_domain!r})")


class Provider:
    """Base class for identity providers (inheriting is optional; the shape is the contract)."""

    api_version = API_VERSION
    fail_open = False  # authorize(): what "cannot tell" means (False: deny)

    def __init__(self, options: Mapping[str, Any], settings: Settings) -> None:
        self.options = options
        self.settings = settings

    def watch(self) -> Iterator[Material]:
        raise NotImplementedError

    def authorizes(self) -> bool:
        """Whether ``authorize`` is to be asked (e.g. only when an option turns it on)."""
        return False

    def authorize(self, client_id: str) -> bool:
        raise NotImplementedError
