"""The ``static`` discovery plugin: services and their endpoints written in the config.

```toml
[[discovery]]
name = "local"
plugin = "static"
[discovery.services]
web = ["127.0.0.1:8081", "127.0.0.1:8082"]
api = [{ address = "10.0.0.5:80", weight = 3, zone = "a", meshed = true }]
```
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from meshd.config import parse_address
from meshd.discovery import Backend, Endpoint, NoSuchService, Reset, Update
from meshd.errors import ConfigError

_ENDPOINT_KEYS = {"address", "weight", "zone", "meshed"}


class StaticBackend(Backend):
    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        super().__init__(name, options)
        problems: list[tuple[str, str]] = []
        for key in options:
            if key != "services":
                problems.append((key, "unknown key"))
        services = options.get("services", {})
        self._services: dict[str, tuple[Endpoint, ...]] = {}
        if not isinstance(services, Mapping):
            problems.append(("services", "expected a table of service = [endpoints]"))
            services = {}
        for service, entries in services.items():
            path = f"services.{service}"
            if not isinstance(entries, list):
                problems.append((path, "expected a list of endpoints"))
                continue
            endpoints = []
            for i, entry in enumerate(entries):
                try:
                    endpoints.append(_endpoint(entry))
                except ValueError as e:
                    problems.append((f"{path}[{i}]", str(e)))
            self._services[service] = tuple(endpoints)
        if problems:
            raise ConfigError(problems)

    def services(self) -> Iterable[str]:
        return tuple(self._services)

    def watch(self, service: str) -> Iterator[Update]:
        endpoints = self._services.get(service)
        yield NoSuchService() if endpoints is None else Reset(endpoints)
        while True:  # the config is the source: it changes only through a reload
            time.sleep(3600)


def _endpoint(entry: object) -> Endpoint:
    if isinstance(entry, str):
        addr = parse_address(entry)
        return Endpoint(addr.host, addr.port)
    if isinstance(entry, Mapping):
        unknown = set(entry) - _ENDPOINT_KEYS
        if unknown:
            raise ValueError(f"unknown key {sorted(unknown)[0]!r}")
        addr = parse_address(entry.get("address"))
        weight = entry.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise ValueError(f"weight: expected a non-negative integer, got {weight!r}")
        zone = entry.get("zone", "")
        meshed = entry.get("meshed", False)
        if not isinstance(zone, str) or not isinstance(meshed, bool):
            raise ValueError("zone must be a string and meshed a boolean")
        return Endpoint(addr.host, addr.port, weight, zone, meshed)
    raise ValueError(f'expected "host:port" or a table with address, got {entry!r}')
