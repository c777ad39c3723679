"""Endpoint entries as the static plugin accepts them, inline or in an endpoints file.

An entry is ``"host:port"`` or a table ``{ address = "host:port", weight = 3, zone = "a",
meshed = true, inbound_port = 4143, identity = "spiffe://cluster.local/ns/default/sa/web" }``
(``inbound_port``: where the meshd in front of a meshed endpoint listens, on the same
host; ``identity``: the SPIFFE ID that meshd must present, checked after the mTLS
handshake once ``[identity]`` is set). Parsing collects every problem with its key path (``web[1]``) rather
than stopping at the first, so a user fixes a file in one go.
"""

from __future__ import annotations

from collections.abc import Mapping

from meshd.config import parse_address
from meshd.discovery import Endpoint
from meshd.identity import spiffe

ENDPOINT_KEYS = frozenset({"address", "weight", "zone", "meshed", "inbound_port", "identity"})

Services = dict[str, tuple[Endpoint, ...]]
Problems = list[tuple[str, str]]


def parse_services(services: object, prefix: str, problems: Problems) -> Services:
    """``{service: [entry, ...]}`` into endpoints; problems are keyed ``{prefix}{service}[i]``."""
    out: Services = {}
    if not isinstance(services, Mapping):
        problems.append((prefix.rstrip(".") or "(top level)",
                         "expected a table of service = [endpoints]"))
        return out
    for service, entries in services.items():
        path = f"{prefix}{service}"
        if not isinstance(entries, list):
            problems.append((path, "expected a list of endpoints"))
            continue
        endpoints = []
        for i, entry in enumerate(entries):
            try:
                endpoints.append(parse_endpoint(entry))
            except KeyedError as e:
                problems.append((f"{path}[{i}].{e.key}", str(e)))
            except ValueError as e:
                problems.append((f"{path}[{i}]", str(e)))
        out[str(service)] = tuple(endpoints)
    return out


class KeyedError(ValueError):
    """A bad value of one key of an entry table (its key path ends in ``key``)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(message)


def parse_endpoint(entry: object) -> Endpoint:
    if isinstance(entry, str):
        addr = parse_address(entry)
        return Endpoint(addr.host, addr.port)
    if isinstance(entry, Mapping):
        unknown = set(entry) - ENDPOINT_KEYS
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
        inbound_port = entry.get("inbound_port", 0)
        if isinstance(inbound_port, bool) or not isinstance(inbound_port, int) \
                or not 0 <= inbound_port <= 65535:
            raise ValueError(f"inbound_port: expected a port 0..65535, got {inbound_port!r}")
        if inbound_port and not meshed:
            raise ValueError("inbound_port is only used with meshed = true")
        identity = entry.get("identity", "")
        if not isinstance(identity, str):
            raise KeyedError("identity", f"expected a SPIFFE ID string, got {identity!r}")
        if identity:
            why = spiffe.problem(identity)
            if why:
                raise KeyedError("identity", why)
            if not meshed:
                raise KeyedError("identity", "only used with meshed = true (the identity a "
                                             "meshd in front of the endpoint presents)")
        return Endpoint(addr.host, addr.port, weight, zone, meshed, inbound_port=inbound_port,
                        identity=identity)
    raise ValueError(f'expected "host:port" or a table with address, got {entry!r}')
