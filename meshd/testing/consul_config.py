"""Consul config entries for the test server (``meshd.testing.consul_server``): the
state behind ``PUT /v1/config``, ``GET /v1/config/<kind>/<name>`` (blocking),
``GET /v1/config/<kind>`` and ``DELETE /v1/config/<kind>/<name>``, as Consul's
"Config" HTTP API documents them.

The index model is Consul's: config entries live in one state-store table whose index
is the raft index of its last write. A read of one entry reports that table index
(also in a 404, so a client can block on an entry that does not exist yet) and a
blocking query on it wakes on a write to any entry: the answer may be unchanged, and a
client must compare. An entry carries ``CreateIndex`` / ``ModifyIndex``; ``?cas=N``
writes (and deletes) only when the entry's ``ModifyIndex`` is N (0: only if absent) and
answers ``false`` otherwise. Entries are global (Consul replicates them from the primary
datacenter), so ``dc`` is accepted and changes nothing.

Consul validates an entry's fields when it is written; this store checks only what
every kind has (``Kind``, ``Name``) and that the kind is one of ``KINDS``, and keeps the
rest as given, so a test can hold an entry a newer Consul accepts that meshd cannot
apply (an RE2-only regex, a filter meshd does not translate).
"""

from __future__ import annotations

import copy as _copy
from dataclasses import dataclass, field
from typing import Any

KINDS = ("service-router", "service-splitter", "service-resolver", "service-defaults",
         "proxy-defaults", "service-intentions")


class ConfigEntryError(ValueError):
    """A write Consul would refuse (400, "Request decode failed" / "invalid config entry")."""


@dataclass
class ConfigStore:
    """Held under the server's lock; ``bump`` is the server's raft-index increment."""
    entries: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    index: int = 1     # the table's index: the raft index of its last write

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        entry = self.entries.get((kind, name))
        return _copy.deepcopy(entry) if entry is not None else None

    def list(self, kind: str, copy: bool = True) -> list[dict[str, Any]]:
        """The entries of ``kind`` by name; ``copy=False``: the stored dicts themselves,
        for a caller that serializes them before the lock is released."""
        found = [e for (k, _), e in sorted(self.entries.items()) if k == kind]
        return [_copy.deepcopy(e) for e in found] if copy else found

    def put(self, body: Any, raft_index: int, cas: int | None) -> bool:
        if not isinstance(body, dict):
            raise ConfigEntryError("Request decode failed: expected a JSON object")
        kind, name = body.get("Kind"), body.get("Name")
        if not isinstance(kind, str) or not kind:
            raise ConfigEntryError('Request decode failed: Payload does not contain a "Kind" key')
        if kind not in KINDS:
            raise ConfigEntryError(f'Request decode failed: invalid config entry kind: {kind}')
        if not isinstance(name, str) or not name:
            raise ConfigEntryError("invalid config entry: Name is required")
        old = self.entries.get((kind, name))
        if cas is not None and (old["ModifyIndex"] if old else 0) != cas:
            return False
        entry = _copy.deepcopy(body)
        entry["CreateIndex"] = old["CreateIndex"] if old else raft_index
        entry["ModifyIndex"] = raft_index
        self.entries[(kind, name)] = entry
        self.index = raft_index
        return True

    def delete(self, kind: str, name: str, raft_index: int, cas: int | None) -> bool:
        old = self.entries.get((kind, name))
        if cas is not None and (old["ModifyIndex"] if old else 0) != cas:
            return False
        if old is not None:
            del self.entries[(kind, name)]
        self.index = raft_index   # Consul's delete writes the table index even when absent
        return True
