"""What the data path needs of its worker, as a ``Protocol``: the handlers (client side,
upstream side, the call) take a ``Context`` rather than the worker class, so none of them
imports ``meshd.worker.process`` (nor ``meshd.worker.entry``, which monkey-patches on import) and each
can be driven in-process by a test with a small stand-in.

``meshd.worker.process.Worker`` is the one implementation; ``tests/test_worker_layout.py``
holds the data path to importing this protocol only.
"""

from __future__ import annotations

import socket
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from meshd.config import Config, ListenerConfig
    from meshd.discovery.api import Endpoint
    from meshd.shm import Stripe
    from meshd.snapshot import Snapshot
    from meshd.worker.access_log import AccessLog
    from meshd.worker.authorize import Gate
    from meshd.worker.balancer import SharedBalancer
    from meshd.worker.decisions import DecisionRing
    from meshd.worker.identity import WorkerIdentity
    from meshd.worker.retries import RetryBudgets
    from meshd.worker.routing import Router
    from meshd.worker.tap import TapSender
    from meshd.worker.tracing import Tracer
    from meshd.worker.upstream.h2_pool import H2Pool
    from meshd.worker.upstream.http1 import Pool
    from meshd.worker.upstream.tls import UpstreamTls


class Idler(Protocol):
    """A client connection the drain may close between requests."""

    idle_since: float  # > 0 while it waits for the next request


class Context(Protocol):
    """A worker as its data path sees it (attributes read per request: a reload makes a
    new worker, never changes these under a request, except ``snapshot``, which the
    worker swaps whole, and ``draining``)."""

    config: Config
    snapshot: Snapshot
    stripe: Stripe                   # this worker's metric counters in shared memory
    balancer: SharedBalancer
    retries: RetryBudgets
    router: Router
    authz: Gate                      # [[authorization]] and the provider's authorize()
    pool: Pool                       # HTTP/1.1 upstream connections
    tls: UpstreamTls                 # TLS targets of services with [service.X.tls]
    identity: WorkerIdentity | None  # with [identity]: mTLS contexts (refresh() on new connections)
    access_log: AccessLog | None     # with [access_log]: the writer's queue (None: no cost)
    tap: TapSender | None            # while someone taps (meshd.worker.tap); None: no cost
    tracer: Tracer | None            # with [tracing]: contexts, spans, the exporter
    observing: bool                  # access_log or tap set: meshd.worker.observe is called
    decisions: DecisionRing | None   # the last balancer decisions (None: could not be created)
    draining: bool
    listeners: list[tuple[ListenerConfig, socket.socket]]

    @property
    def connections(self) -> MutableMapping[Any, Idler | None]: ...
    # client connections being served, by greenlet: the drain closes the idle ones

    @property
    def h2pool(self) -> H2Pool: ...  # HTTP/2 upstream connections (made on first use)

    def resolve(self, service: str) -> tuple[Endpoint, ...] | None: ...

    def ask_row(self, listener: str, client_id: str) -> None: ...
    # a client identity without metric rows: the control process assigns them (rowkeys)

    def ask_authority_row(self, listener: str, base_key: str, authority: str) -> None: ...
    # an authority without its own metric row (rowkeys): at most once a second each

    def authority_rows(self, listener: str) -> int: ...
    # rows with an authority the snapshot gives ``listener`` (against MAX_AUTHORITY_ROWS)
