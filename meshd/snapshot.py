"""Endpoint snapshots: what the control process hands to workers.

A snapshot is an immutable value: for every service, its endpoints, and for every
(listener, service) pair the row of the shared-memory region that counts its traffic.
The control process of config generation G writes it, msgpack-encoded, to
``{shm_dir}/meshd-{instance}-{master pid}-g{G}.snap`` with write-to-temp-then-rename, so a
reader sees either the old file or the new one, whole. The name is predictable, so the
file is created exclusively (0600) in meshd's private directory, and read only once it
proves to be meshd's own (``meshd.private_files``): a snapshot routes traffic. Workers of generation G load it
at boot and reload it when its mtime changes; they swap their reference to the decoded
value in one assignment, so a request sees one snapshot from start to end.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from meshd.discovery.api import Endpoint
from meshd.private_files import read_trusted

FORMAT = 2  # 2: endpoints carry inbound_port, identity and labels


@dataclass(frozen=True, slots=True)
class Snapshot:
    generation: int
    seq: int
    services: Mapping[str, tuple[Endpoint, ...]]
    # rows[listener][service] -> shm row
    rows: Mapping[str, Mapping[str, int]]
    synced: bool = True
    errors: Mapping[str, str] = field(default_factory=dict)
    absent: frozenset[str] = frozenset()   # services the sources say do not exist
    endpoint_rows: Mapping[str, int] = field(default_factory=dict)  # "host:port" -> shm row
    # service -> [(share, start, end)]: traffic split between runs of its endpoints
    splits: Mapping[str, list[tuple[int, int, int]]] = field(default_factory=dict)
    # service -> its effective fleet policy, packed (``meshd.fleet.wire.pack``); the
    # version changes whenever any of them does (workers unpack and recompile only then,
    # and only the policies whose bytes changed)
    fleet: Mapping[str, bytes] = field(default_factory=dict)
    fleet_version: str = ""

    def row(self, listener: str, service: str) -> int | None:
        by_service = self.rows.get(listener)
        return None if by_service is None else by_service.get(service)

    def unknown_reason(self, service: str) -> str:
        """Why ``service`` has no endpoints here, for the 503 a client gets: a source
        whose watch fails (not knowing is then not the same as not existing), or no
        source knowing it."""
        failing = self.errors.get(service)
        if failing and service not in self.absent:
            source, _, error = failing.partition(": ")
            error = "".join(c if " " <= c < "\x7f" else " " for c in error)[:300]
            return f"discovery source {source!r} failing for service {service!r}: {error}"
        return f"unknown service {service!r}: no discovery source knows it"

    def encode(self) -> bytes:
        data: dict[str, Any] = {
            "format": FORMAT,
            "generation": self.generation,
            "seq": self.seq,
            "synced": self.synced,
            "errors": dict(self.errors),
            "absent": sorted(self.absent),
            "endpoint_rows": dict(self.endpoint_rows),
            "splits": {k: [list(t) for t in v] for k, v in self.splits.items()},
            "services": {
                name: [[e.host, e.port, e.weight, e.zone, e.meshed, e.inbound_port, e.identity,
                        [list(kv) for kv in e.labels]] for e in eps]
                for name, eps in self.services.items()
            },
            "rows": {listener: dict(rows) for listener, rows in self.rows.items()},
            "fleet": dict(self.fleet),
            "fleet_version": self.fleet_version,
        }
        return bytes(msgpack.packb(data, use_bin_type=True))

    @classmethod
    def decode(cls, raw: bytes) -> Snapshot:
        """Raises ValueError on anything that is not a snapshot of this format."""
        try:
            data = msgpack.unpackb(raw, raw=False)
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                found = data.get("format") if isinstance(data, dict) else type(data).__name__
                raise ValueError(f"snapshot format {found!r}, expected {FORMAT}")
            services = {
                name: tuple(Endpoint(h, p, w, z, m, i, ident, tuple((k, v) for k, v in labels))
                            for h, p, w, z, m, i, ident, labels in eps)
                for name, eps in data["services"].items()
            }
            return cls(
                generation=data["generation"],
                seq=data["seq"],
                services=services,
                rows=data["rows"],
                synced=data.get("synced", True),
                errors=data.get("errors", {}),
                absent=frozenset(data.get("absent", ())),
                endpoint_rows=data.get("endpoint_rows", {}),
                splits={k: [(a, b, c) for a, b, c in v] for k, v in data.get("splits", {}).items()},
                fleet={str(k): bytes(v) for k, v in data.get("fleet", {}).items()},
                fleet_version=data.get("fleet_version", ""),
            )
        except (KeyError, TypeError, AttributeError, msgpack.UnpackException) as e:
            raise ValueError(f"not a valid snapshot: {type(e).__name__}: {e}") from None


def snapshot_path(shm_dir: str, instance: str, master_pid: int, generation: int) -> str:
    return os.path.join(shm_dir, f"meshd-{instance}-{master_pid}-g{generation}.snap")


def control_socket_path(shm_dir: str, instance: str, master_pid: int, generation: int) -> str:
    """The control process's datagram socket: a worker sends a service name to it to ask
    for that service to be watched (the first request for a service not yet known)."""
    return os.path.join(shm_dir, f"meshd-{instance}-{master_pid}-g{generation}.ctl")


def read(path: str, uid: int | None = None) -> Snapshot:
    """The snapshot at ``path``. Raises OSError (``UntrustedFile`` for a file meshd did
    not write: another owner, a link, writable by others) or ValueError."""
    return Snapshot.decode(read_trusted(path, uid))
