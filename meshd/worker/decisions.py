"""A worker's side of the balancer decisions ring (the format: ``meshd.decisions``).

``DecisionRing.record`` writes one record per attempt, when its outcome is known: the
response head was classified (before the body is relayed, so a long stream shows at
once), or the attempt failed. ``attempt_ended`` is what the attempt loop
(``meshd.worker.call``) calls: it turns the call's state (the balancer's view of the pick,
``Call.pick``; the status, failure kind, error and the retry refusal the loop noted)
into that record.

Cost when nobody reads: one ``struct.pack_into`` of a fixed record into a mapped tmpfs
page and three 8-byte stores, no syscall, no lock, nothing queued; the strings are
names encoded once and kept (``_encoded``: service, route, outcome, refusal) and the
endpoint addresses the balancer encoded once per snapshot. A reader never slows the writer (seqlock, ``meshd.decisions``).
"""

from __future__ import annotations

import logging
import mmap
import struct
import time
from typing import TYPE_CHECKING

from meshd import decisions as fmt
from meshd.errors import ProxyError
from meshd.ratelog import Throttle

if TYPE_CHECKING:
    from meshd.worker.call import Call
    from meshd.worker.context import Context

log = logging.getLogger("meshd.worker")
_quiet = Throttle(log)

_ERROR_CUT = fmt.ERROR_BYTES
# Bound once: ``record`` runs on every attempt, and each module attribute is a lookup.
_pack_into = fmt.BODY.pack_into
_now = time.time
_clock = time.monotonic
_CAPACITY = fmt.CAPACITY
_WRITTEN = fmt.OFF_WRITTEN >> 3
_RETRIED = fmt.FLAG_RETRIED
# Names encoded for the record (service, route, outcome, no_retry: from the config and
# the proxy's own words, never the client's), kept; cleared when it reaches _NAMES_MAX.
_names: dict[str, bytes] = {"": b""}
_NAMES_MAX = 4096


def _encoded(text: str) -> bytes:
    raw = _names.get(text)
    if raw is None:
        if len(_names) >= _NAMES_MAX:
            _names.clear()
            _names[""] = b""
        raw = _names[text] = text.encode("utf-8", "replace")
    return raw


class DecisionRing:
    """The worker's ring file, mapped; ``record`` is its only writer."""

    def __init__(self, mm: mmap.mmap, path: str) -> None:
        self.mm = mm
        self.path = path
        self.q = memoryview(mm).cast("B").cast("Q")
        self.written = 0
        # Record k's (seq index in q, body offset), for k % CAPACITY.
        self._at = tuple(((fmt.HEADER_SIZE + i * fmt.RECORD_SIZE) >> 3,
                          fmt.HEADER_SIZE + i * fmt.RECORD_SIZE + 8) for i in range(_CAPACITY))

    @classmethod
    def open(cls, shm_dir: str, instance: str, master_pid: int, slot: int, pid: int,
             generation: int) -> DecisionRing | None:
        """The slot's ring, created anew; None (logged) when it cannot be: the worker
        serves without one."""
        path = fmt.ring_path(shm_dir, instance, master_pid, slot)
        try:
            mm = fmt.create(path, slot, pid, generation)
        except OSError as e:
            log.warning("balancer decisions not recorded: cannot create %s: %s", path,
                        e.strerror or e)
            return None
        return cls(mm, path)

    def record(self, service: bytes, route: bytes, attempt: int, retried: bool, status: int,
               latency: float, outcome: bytes, error: bytes, no_retry: bytes,
               seen: tuple[object, ...]) -> None:
        k = self.written
        idx, body = self._at[k % _CAPACITY]
        q = self.q
        q[idx] = 2 * k + 1                      # odd: being written
        _pack_into(self.mm, body, _now(), latency, status, attempt if attempt < 255 else 255,
                   _RETRIED if retried else 0, service, route, outcome, error, no_retry,
                   *seen)
        q[idx] = 2 * k + 2                      # even: whole
        self.written = k = k + 1
        q[_WRITTEN] = k

    def set_dropped(self, n: int) -> None:
        """The access log's count of dropped lines (its writer calls this, off the
        request path), for meshd_access_log_dropped_total."""
        self.q[fmt.OFF_DROPPED >> 3] = n


def attempt_ended(worker: Context, call: Call, retried: bool,
                  e: BaseException | None = None) -> None:
    """Record the attempt ``call`` last started, once (``call.pick`` is cleared): its
    outcome is known. ``retried``: another attempt follows; ``e``: what ended it, if it
    did not end with a response head."""
    seen = call.pick
    ring = worker.decisions
    if seen is None or ring is None:
        return
    call.pick = None
    status = call.status
    kind = call.kind
    error = b""
    if e is not None and not retried and not kind:
        kind = "error"
    err = call.error
    call.error = None   # its traceback holds the call's frames: no cycle kept alive
    if err is not None:
        if isinstance(err, ProxyError):
            text = err.reason
        elif isinstance(err, OSError):
            text = err.strerror or str(err)
        else:
            text = type(err).__name__
        error = text.encode("utf-8", "replace")[:_ERROR_CUT]
    route = call.policy.route
    names = _names   # names met before: a dict lookup (b"" falls through to _encoded)
    service = call.service
    outcome = kind or "ok"
    no_retry = call.no_retry
    try:
        ring.record(names.get(service) or _encoded(service),
                    names.get(route) or _encoded(route) if route else b"",
                    len(call.tried), retried, status, _clock() - call.sent_at,
                    names.get(outcome) or _encoded(outcome), error,
                    names.get(no_retry) or _encoded(no_retry), seen)
    except struct.error as err:   # a value out of its field's range: no record, no harm
        _quiet.warning("decisions.record", "balancer decision not recorded: %s", err)
