"""``jsonurl``: a copy-me meshd discovery plugin. Endpoints come from a JSON document.

    [[discovery]]
    name = "inventory"
    plugin = "jsonurl"                        # the entry-point name in setup.cfg
    url = "http://inventory.local/services.json"
    interval = "5s"                           # optional: how often to ask (default 5s)

The URL answers ``{"web": ["10.0.0.1:80", "10.0.0.2:80"], ...}``. Copy this package,
rename it, replace ``_fetch`` with your backend's call; keep the shape of ``watch``.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any

# Everything a plugin needs comes from these two modules (the stable API, version 1).
from meshd.config import parse_address, parse_duration
from meshd.discovery import Backend, Endpoint, NoSuchService, Reset, Update
from meshd.errors import ConfigError


class JsonUrlBackend(Backend):
    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        # Validate every option here and report all problems at once, keyed by the option
        # name: `meshd check` prints them as "FILE: discovery[0].url: ...". No I/O here:
        # `meshd check` constructs the backend too, maybe on a machine without a network.
        super().__init__(name, options)
        problems = [(key, "unknown key") for key in options if key not in ("url", "interval")]
        url = options.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            problems.append(("url", f"expected an http:// or https:// URL, got {url!r}"))
        self.url = str(url)
        try:
            self.interval = parse_duration(options.get("interval", "5s"))
        except ValueError as e:
            problems.append(("interval", str(e)))
        if problems:
            raise ConfigError(problems)
        # close() sets this; a watch sleeps on it, so it ends at once instead of next poll.
        self._closed = threading.Event()
        # No proxy from the environment: discovery must not go through the mesh it feeds.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def watch(self, service: str) -> Iterator[Update]:
        # meshd runs one watch per service, in its own greenlet of the control process.
        # Blocking calls (urllib, time.sleep, Event.wait) are cooperative there: block freely.
        # Each watch polls on its own, which is simple; a source of thousands of services
        # would share one poll between its watches (docs/plugins.md, "Many watches").
        etag = ""
        last: tuple[Endpoint, ...] | None = None
        first = True
        while not self._closed.is_set():
            # Errors are raised, not swallowed: meshd logs them, keeps the endpoints this
            # watch gave last (fail static), persists them, and calls watch() again later.
            document, etag = self._fetch(etag)
            if document is not None:                      # None: 304, unchanged
                entries = document.get(service)
                current = None if entries is None else self._endpoints(service, entries)
                # Yield changes only; Reset replaces the whole set. (Add/Remove exist for
                # backends that learn about changes one endpoint at a time.)
                if first or current != last:
                    yield NoSuchService() if current is None else Reset(current)
                    first, last = False, current
            self._closed.wait(self.interval)

    def _fetch(self, etag: str) -> tuple[dict[str, Any] | None, str]:
        request = urllib.request.Request(self.url, headers={"If-None-Match": etag} if etag else {})
        try:
            with self._opener.open(request, timeout=10) as response:   # always a deadline
                document = json.load(response)
                etag = response.headers.get("ETag", "")
        except urllib.error.HTTPError as e:
            if e.code == 304:
                return None, etag
            raise RuntimeError(f"{self.url}: HTTP {e.code} {e.reason}") from None
        except (OSError, ValueError) as e:    # unreachable, timed out, not JSON
            raise RuntimeError(f"{self.url}: {e}") from None
        if not isinstance(document, dict):
            raise RuntimeError(f"{self.url}: expected a JSON object of service -> [host:port]")
        return document, etag

    def _endpoints(self, service: str, entries: Any) -> tuple[Endpoint, ...]:
        if not isinstance(entries, list):      # say where: the URL and the key
            raise RuntimeError(f"{self.url}: {service}: expected a list of \"host:port\"")
        try:
            return tuple(Endpoint(a.host, a.port) for a in map(parse_address, entries))
        except ValueError as e:
            raise RuntimeError(f"{self.url}: {service}: {e}") from None

    def close(self) -> None:
        # Called once when the control process stops: end every watch promptly.
        self._closed.set()
