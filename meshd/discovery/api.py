"""The discovery plugin contract (API version 1).

A plugin is a class, published by a distribution under the entry-point group
``meshd.discovery``; the entry point's name is what ``plugin = "..."`` in a
``[[discovery]]`` table picks. meshd constructs it once per source as
``Backend(name, options)`` (``options`` = the table's keys other than ``name`` and
``plugin``), then, in the control process, calls ``watch(service)`` once per service that
traffic needs and iterates the generator in its own greenlet. Blocking calls inside
``watch`` (``time.sleep``, sockets, ``requests``) are cooperative there: the control
process is gevent-patched.

``watch`` yields updates: ``Reset`` (the full set, replacing whatever came before),
``Add`` / ``Remove`` (changes against the current set) and ``NoSuchService``. A watch that
raises is logged with the plugin's distribution and restarted with backoff; the last
endpoints it gave stay in use meanwhile (fail static).

Optional, still API version 1 (meshd calls it only when a backend has it): ``knows(service)``
says, from what the source already holds and without blocking, whether it has a service
now (True / False) or cannot tell (None). meshd asks it for every name a client's request
names: a name a source knows is never refused a watch nor evicted for made-up ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

API_VERSION = 1


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One instance of a service.

    ``weight`` scales its share of traffic (0: never picked); ``zone`` names its
    failure domain; ``labels`` are free-form (key, value) pairs from the source (tags,
    node meta, pod labels), sorted. ``meshed``: the instance is fronted by a meshd,
    whose inbound listener is ``inbound_port`` on the same host and whose workload
    identity (a SPIFFE ID) is ``identity``.
    """

    host: str
    port: int
    weight: int = 1
    zone: str = ""
    meshed: bool = False
    inbound_port: int = 0
    identity: str = ""
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Reset:
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class Add:
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class Remove:
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class NoSuchService:
    pass


Update = Reset | Add | Remove | NoSuchService


def apply(current: tuple[Endpoint, ...], update: Update) -> tuple[Endpoint, ...]:
    """The endpoint set after ``update``: an added address replaces its old entry in place."""
    if isinstance(update, Reset):
        return tuple(dict.fromkeys(update.endpoints))
    if isinstance(update, Add):
        new = {e.address: e for e in update.endpoints}
        kept = tuple(new.pop(e.address, e) for e in current)
        return kept + tuple(new.values())
    if isinstance(update, Remove):
        gone = {e.address for e in update.endpoints}
        return tuple(e for e in current if e.address not in gone)
    return ()


class Backend:
    """Base class for discovery backends (inheriting is optional; the shape is the contract).

    ``__init__`` validates ``options`` and raises ``meshd.errors.ConfigError`` with key
    paths relative to the ``[[discovery]]`` table (e.g. ``("services.web[0]", "...")``).
    """

    api_version = API_VERSION

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        self.name = name
        self.options = options

    def services(self) -> Iterable[str]:
        """Services this source knows up front (watched from the start). May be empty."""
        return ()

    def knows(self, service: str) -> bool | None:
        """Optional: whether the source has ``service`` now, answered from memory (called
        for every name clients ask for, in the control process's request path: no blocking
        I/O). None: cannot tell (the default), and meshd treats the name as unknown."""
        return None

    def watch(self, service: str) -> Iterator[Update]:
        raise NotImplementedError

    def close(self) -> None:
        """Release connections; called when the control process stops."""
