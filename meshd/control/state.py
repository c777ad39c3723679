"""The last good endpoints of every service, persisted under ``state_dir``.

Written by the control process (atomically, 0600 in the private ``state_dir``: see
``meshd.private_files``; at most every SAVE_INTERVAL) after
discovery changes, read when it starts: meshd restarted while Consul or the API server
is down still routes, from endpoints marked stale until their source answers again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

import msgpack

from meshd.discovery.api import Endpoint
from meshd.private_files import read_trusted, write_atomic

log = logging.getLogger("meshd.control")

FORMAT = 1
SAVE_INTERVAL = 1.0

# service -> source -> endpoints
Saved = dict[str, dict[str, tuple[Endpoint, ...]]]


def state_path(state_dir: str, instance: str) -> str:
    return os.path.join(state_dir, f"{instance}.endpoints")


def encode(services: Mapping[str, Mapping[str, tuple[Endpoint, ...]]]) -> bytes:
    data = {
        "format": FORMAT,
        "saved_at": time.time(),
        "services": {
            service: {
                source: [[e.host, e.port, e.weight, e.zone, e.meshed, e.inbound_port, e.identity,
                          [list(kv) for kv in e.labels]] for e in eps]
                for source, eps in by_source.items()
            }
            for service, by_source in services.items()
        },
    }
    return bytes(msgpack.packb(data, use_bin_type=True))


def decode(raw: bytes) -> tuple[Saved, float]:
    """(services, saved_at). Raises ValueError on anything else."""
    try:
        data = msgpack.unpackb(raw, raw=False)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not a meshd endpoint state file of a known format")
        services: Saved = {
            service: {
                source: tuple(Endpoint(h, p, w, z, m, i, ident, tuple((k, v) for k, v in labels))
                              for h, p, w, z, m, i, ident, labels in eps)
                for source, eps in by_source.items()
            }
            for service, by_source in data["services"].items()
        }
        return services, float(data["saved_at"])
    except (KeyError, TypeError, AttributeError, msgpack.UnpackException) as e:
        raise ValueError(f"corrupt endpoint state: {type(e).__name__}: {e}") from None


def load(path: str) -> tuple[Saved, float]:
    """What was saved, or nothing (logged) when the file is missing, unreadable, or not
    meshd's own (another owner, a link, writable by others: it would route traffic)."""
    try:
        return decode(read_trusted(path))
    except FileNotFoundError:
        return {}, 0.0
    except (OSError, ValueError) as e:
        log.warning("ignoring persisted endpoints %s: %s", path, e)
        return {}, 0.0


def save(path: str, services: Mapping[str, Mapping[str, tuple[Endpoint, ...]]]) -> None:
    """Replace the file (0600, created exclusively; the master made ``state_dir``)."""
    write_atomic(path, encode(services))
