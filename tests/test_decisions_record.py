"""The worker's record writer (meshd.worker.decisions) as the reader sees it: every
field round trips through the ring, the ring wraps, and the names it keeps encoded are
bounded (the writer's shortcuts change nothing of what /debug/decisions shows)."""

from __future__ import annotations

import os
import tempfile
import types

from meshd import decisions as fmt
from meshd.worker import decisions as wd

SEEN = (fmt.MODE_P2C, 3, 1, 2, 0, b"10.0.0.1:80", b"10.0.0.1:80", 0.5, 2, 1.0, 0,
        b"10.0.0.2:80", 0.75, 4, 2.0, 0, b"10.0.0.3:80", b"")


def _ring() -> wd.DecisionRing:
    path = os.path.join(tempfile.mkdtemp(prefix="meshd-dec-rec-"), "w0.dec")
    return wd.DecisionRing(fmt.create(path, 0, 1, 1), path)


def _call(service: str, route: str, kind: str, no_retry: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(pick=SEEN, status=503, kind=kind, error=None,
                                 policy=types.SimpleNamespace(route=route), service=service,
                                 tried=[0, 1], sent_at=0.0, no_retry=no_retry)


def test_every_field_round_trips_and_the_ring_wraps():
    ring = _ring()
    worker = types.SimpleNamespace(decisions=ring)
    total = fmt.CAPACITY + 5
    for n in range(total):
        wd.attempt_ended(worker, _call(f"své-{n}", "r1" if n % 2 else "", "" if n % 3 else
                                       "status", "budget" if n % 5 == 0 else ""), n % 2 == 1)
    parsed = fmt.parse(ring.mm)
    assert parsed is not None and parsed.written == total
    assert len(parsed.records) == fmt.CAPACITY
    newest = parsed.records[0]
    n = total - 1
    assert newest["seq"] == 2 * n + 2
    assert newest["service"] == f"své-{n}"
    assert newest["route"] == ("r1" if n % 2 else "")
    assert newest["outcome"] == ("ok" if n % 3 else "status")
    assert newest["no_retry"] == ("budget" if n % 5 == 0 else "")
    assert newest["flags"] == (fmt.FLAG_RETRIED if n % 2 else 0)
    assert (newest["status"], newest["attempt"]) == (503, 2)
    tail = {k: newest[k] for k in fmt.FIELDS[10:]}
    assert tail == {**dict(zip(fmt.FIELDS[10:], SEEN, strict=True)), "pick": "10.0.0.1:80",
                    "a_address": "10.0.0.1:80", "b_address": "10.0.0.2:80",
                    "ejected_1": "10.0.0.3:80", "ejected_2": ""}
    assert parsed.records[-1]["seq"] == 2 * (total - fmt.CAPACITY) + 2   # oldest kept


def test_attempt_past_255_is_clamped_and_the_name_cache_is_bounded():
    ring = _ring()
    ring.record(b"s", b"", 300, False, 200, 0.1, b"ok", b"", b"", SEEN)
    parsed = fmt.parse(ring.mm)
    assert parsed is not None and parsed.records[0]["attempt"] == 255
    for n in range(wd._NAMES_MAX + 10):
        assert wd._encoded(f"name-{n}") == f"name-{n}".encode()
    assert len(wd._names) <= wd._NAMES_MAX
    assert wd._encoded("") == b""
