"""The ``static`` discovery plugin: endpoints written in the config, or in a file that
meshd watches.

```toml
[[discovery]]
name = "local"
plugin = "static"
file = "/etc/meshd/endpoints.toml"   # optional: reread on change (TOML, or JSON by extension)
interval = "1s"                      # how often the file is looked at
[discovery.services]                 # optional: fixed endpoints
web = ["127.0.0.1:8081", "127.0.0.1:8082"]
api = [{ address = "10.0.0.5:80", weight = 3, zone = "a", meshed = true,
        identity = "spiffe://cluster.local/ns/default/sa/api" }]
```

The file holds ``service = [entries]`` at its top level (JSON: one object), with the entry
forms of ``services``; a service is given inline or in the file, not in both. Write it
atomically (a temporary file renamed over it) so a half-written file is never read.

``watch(service)`` yields ``Reset`` whenever the service's entries change and
``NoSuchService`` while neither the inline table nor the file has it; ``knows(service)``
answers the same from memory. A file that turns
invalid or disappears makes every watch of the file's services raise once, with the file
and the key path in the message: meshd keeps their last endpoints (fail static) and logs
it; the watch meshd restarts then waits quietly for the file to change, and the first good
content is yielded at once. No I/O happens in ``__init__``: the file is first read by
``services()`` (called once by meshd at start) or by the first watch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from meshd.config import parse_duration
from meshd.discovery import Backend, NoSuchService, Reset, Update
from meshd.errors import ConfigError, MeshdError
from meshd_static.endpoints_file import EndpointsFile, FileState
from meshd_static.entries import Problems, parse_services

__all__ = ["StaticBackend", "StaticFileError"]

log = logging.getLogger("meshd.discovery.static")

_KEYS = ("services", "file", "interval")
DEFAULT_INTERVAL = 1.0
MAX_RAISED = 4096
_UNSET: Any = object()


class StaticFileError(MeshdError):
    """The endpoints file is missing or invalid; the message names the file and key path."""

    status = 503
    reason = "endpoints file unusable"


class StaticBackend(Backend):
    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        super().__init__(name, options)
        problems: Problems = []
        for key in options:
            if key not in _KEYS:
                problems.append((key, "unknown key"))
        self._services = parse_services(options.get("services", {}), "services.", problems)
        self._closed = threading.Event()
        self._raised: dict[str, int] = {}   # service -> file version its watch raised for
        self._file: EndpointsFile | None = None
        interval = DEFAULT_INTERVAL
        if "interval" in options:
            try:
                interval = parse_duration(options["interval"])
                if not 0.01 <= interval <= 3600:
                    raise ValueError(f"must be between 10ms and 1h, got {options['interval']!r}")
            except ValueError as e:
                problems.append(("interval", str(e)))
        path = options.get("file")
        if path is not None:
            if not isinstance(path, str) or not path:
                problems.append(("file", f"expected a file path, got {path!r}"))
            else:
                self._file = EndpointsFile(path, interval, self._closed, self._services)
        elif "interval" in options:
            problems.append(("interval", "only used with file"))
        if problems:
            raise ConfigError(problems)

    def services(self) -> Iterable[str]:
        names = list(self._services)
        if self._file is not None:
            state = self._file.check()
            if state.error is not None:
                log.warning("discovery source %s: %s", self.name, state.error)
            names += list(state.services or ())
        return tuple(names)

    def knows(self, service: str) -> bool | None:
        """From memory (meshd asks for every name a client names): inline, or in the file
        as last read (before its first read: cannot tell)."""
        if service in self._services:
            return True
        if self._file is None:
            return False
        services = self._file.state().services
        return None if services is None else service in services

    def watch(self, service: str) -> Iterator[Update]:
        endpoints = self._services.get(service)
        if endpoints is not None or self._file is None:
            # The config is the source: it changes only through a reload.
            yield NoSuchService() if endpoints is None else Reset(endpoints)
            self._closed.wait()
            return
        file = self._file
        state: FileState | None = file.check()
        last: Any = _UNSET
        while state is not None:
            if state.error is None:
                current = (state.services or {}).get(service)
                if current != last:
                    last = current
                    yield NoSuchService() if current is None else Reset(current)
            elif self._raised.get(service) != state.version:
                # Once per bad state: the watch meshd restarts after this waits for a change.
                if len(self._raised) >= MAX_RAISED:  # names are clients' to make up
                    self._raised.clear()   # at worst a watch raises once more
                self._raised[service] = state.version
                raise StaticFileError(f"{state.error} (keeping the last good endpoints)")
            state = file.wait(state.version)

    def close(self) -> None:
        self._closed.set()
        if self._file is not None:
            self._file.close()

