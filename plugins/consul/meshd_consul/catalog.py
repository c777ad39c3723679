"""The service names of the local datacenter's catalog, kept current by one blocking query.

meshd asks ``knows(name)`` for every name a client's request names, and made-up names must
cost neither a query nor a connection to the agent each (an agent allows 200 connections
per client address by default, ``limits.http_max_conns_per_client``). One loop long-polls
``GET /v1/catalog/services`` (the same blocking-query rules and token bucket as a
service's watch) and keeps the set of names; ``has(name)`` answers from it, and the watch
of a name the catalog lacks waits here, on the set changing, instead of long-polling the
agent about a service that does not exist.

Started on first use (never in ``__init__``: meshd's master imports and constructs plugins
to check a config). Until its first answer ``has`` cannot tell (None). When the agent
fails or ACLs filter the list, the loop backs off and retries; the last set is kept
meanwhile (fail static), and a token that sees no names at all is "cannot tell".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from meshd_consul.entries import TokenBucket, next_index

log = logging.getLogger("meshd.discovery.consul")

BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0
WAIT_SLICE = 1.0   # waiters re-check the closed flag at least this often


class Catalog:
    def __init__(self, agent: str, datacenter: str, wait: str, min_interval: float,
                 closed: threading.Event, query: Callable[[int], tuple[int, Any, bool]],
                 release: Callable[[], None]) -> None:
        """``query(index)`` makes one blocking read: (returned index, {name: tags} or None,
        filtered by ACLs); it raises on failure. ``release`` ends the loop's client."""
        self.agent = agent
        self.datacenter = datacenter
        self.wait = wait
        self.min_interval = min_interval
        self._closed = closed
        self._query = query
        self._release = release
        self._cond = threading.Condition()
        self._names: frozenset[str] | None = None
        self._index = 0
        self._started = False

    @property
    def index(self) -> int:
        """The X-Consul-Index of the set held (0: none yet)."""
        with self._cond:
            return self._index

    @property
    def started(self) -> bool:
        with self._cond:
            return self._started

    def has(self, name: str, start: bool = True) -> bool | None:
        """Whether the catalog lists ``name``; None until its first answer."""
        if start:
            self.start()
        with self._cond:
            return None if self._names is None else name.lower() in self._names

    def start(self) -> None:
        with self._cond:
            if self._started or self._closed.is_set():
                return
            self._started = True
        threading.Thread(target=self._run, name=f"consul-catalog-{self.agent}",
                         daemon=True).start()

    def wait_synced(self, timeout: float) -> bool:
        """Wait for the first answer, up to ``timeout``; True once there is one."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._names is None and not self._closed.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, WAIT_SLICE))
            return self._names is not None

    def wait_for(self, name: str) -> bool:
        """Block until the catalog lists ``name`` (True) or the backend closes (False)."""
        with self._cond:
            while not self._closed.is_set():
                if self._names is not None and name.lower() in self._names:
                    return True
                self._cond.wait(WAIT_SLICE)
        return False

    def close(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _set(self, names: frozenset[str] | None, index: int) -> None:
        with self._cond:
            if names is not None:
                self._names, self._index = names, index
            self._cond.notify_all()

    def _run(self) -> None:
        index, failures = 0, 0
        bucket = TokenBucket(self.min_interval, now=time.monotonic())
        try:
            while not self._closed.is_set():
                if failures:
                    delay = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(failures, 10))
                    if self._closed.wait(delay):
                        return
                delay = bucket.reserve(time.monotonic())
                if delay and self._closed.wait(delay):
                    return
                try:
                    returned, services, filtered = self._query(index)
                except Exception as e:
                    if self._closed.is_set():
                        return
                    failures += 1
                    log.warning("consul %s: watching the catalog's service names failed: %s; "
                                "retrying (names it lacks are watched one by one meanwhile)",
                                self.agent, e)
                    continue
                if filtered and not services:
                    failures += 1
                    log.warning("consul %s: catalog/services filtered by ACLs (the token lacks "
                                "service:read): cannot tell which names exist", self.agent)
                    continue
                failures = 0
                new_index = next_index(index, returned)
                if new_index == 0 and index:
                    index = 0   # the index went backwards: a full read
                    continue
                index = new_index
                # Lower case: Consul looks service names up case-insensitively.
                self._set(frozenset(n.lower() for n in services or ()), returned)
        finally:
            self._release()
            self._set(None, 0)
