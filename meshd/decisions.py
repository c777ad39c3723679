"""The balancer decisions ring: the file format, its path, and its reader.

Each worker keeps its last CAPACITY balancer decisions, one record per attempt, in its own
small file beside the shared-memory region: ``{shm_dir}/meshd-{instance}-{master
pid}-w{slot}.dec`` (0600 in meshd's private directory, tmpfs). The worker writes it
(``meshd.worker.decisions``); the control process reads every worker's for the admin
API's ``/debug/decisions`` (``meshd.control.decisions``). A file of its own, not a section
of the region (``meshd.shm``): its size and record format change without touching the
region's layout, and a worker that cannot create it only goes without.

A worker creates its file when it boots (at a temporary name, renamed into place, so a
reader sees the previous occupant's file or the new one, whole) and the master unlinks it
when it reaps the slot's process, and all of them when it exits.

Layout, byte by byte (little endian)::

    offset  size  field
    ------  ----  ---------------------------------------------------------------
    0       8     magic b"MESHDDEC"
    8       4     version (u32)          -- readers refuse another
    12      4     record size (u32) = RECORD_SIZE
    16      4     capacity (u32) = CAPACITY records
    20      4     worker slot (u32)
    24      8     worker pid (u64)
    32      8     generation (u64)
    40      8     records written (u64)  -- after each record: the next one's number
    48      8     access log lines dropped (u64): the worker's [access_log] writer stores
                  its count here (not a decision: the one worker counter the control
                  process exports, as meshd_access_log_dropped_total, from these files)
    56      8     reserved
    64      CAPACITY x RECORD_SIZE     records; record k (0, 1, ...) at
                                        64 + (k % CAPACITY) * RECORD_SIZE

    record: +0 seq (u64): 0 never written, 2k+1 while record k is written, 2k+2 once
    it is whole; then BODY's fields in order (see FIELDS): time (f64, unix s, when the
    attempt's outcome was known), latency (f64 s: request sent to response head, or to
    the failure), status (u16, 0: no response head), attempt (u8, 1 = first), flags (u8:
    bit 0 another attempt followed), service (128s), route (32s), outcome (16s), error
    (64s), no_retry (24s), then what the balancer saw: mode (u8, MODES), endpoints
    (u16: the service's, or the split's), ejected (u16: of those, skipped as ejected or
    tripped), candidates (u8: 0-2 costed), pick state (u8, STATES), pick address
    (64s), two candidates of address (64s), cost (f64 s: peak EWMA x (in-flight + 1)),
    in-flight (i64, all workers), weight (f64), state (u8), and the first two ejected
    addresses (64s each). Strings are UTF-8 cut to their field, NUL padded.

One writer per file (the worker in the slot), any number of readers. Records are
seqlocked: the writer stores the odd seq, the body (one ``pack_into``), then the even seq;
a reader copies a record between two reads of its seq and keeps it only when both are the
same even value: a record being written, or left half written by a worker killed mid
write, is skipped, never misread. This relies on the stores happening in program order,
as the region's health seqlock does (``meshd.shm``, "Concurrent readers"; x86-64).

Cost to the worker (meshd.worker.decisions): per attempt, one ``pack_into`` into the
mapped page and three 8-byte stores; no syscall, no allocation beyond the argument tuple.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

from meshd.private_files import create_temp, open_trusted

MAGIC = b"MESHDDEC"
VERSION = 1
CAPACITY = 256          # records per worker: the last 256 attempts it made
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIIIQQQQ8x")
OFF_WRITTEN = 40
OFF_DROPPED = 48
SERVICE_BYTES = 128     # a longer service name is cut (two names sharing these bytes alias)
ROUTE_BYTES = 32
ADDRESS_BYTES = 64
ERROR_BYTES = 64

# The record after its seq: what the attempt was and how it went, then what the
# balancer saw (the tail a SharedBalancer builds: meshd.worker.balancer's ``last``).
BODY: struct.Struct = struct.Struct(
    "<ddHBB"                       # time, latency, status, attempt, flags
    f"{SERVICE_BYTES}s{ROUTE_BYTES}s16s{ERROR_BYTES}s24s"  # service .. no_retry
    "BHHBB"                        # mode, endpoints, ejected, candidates, pick state
    f"{ADDRESS_BYTES}s"            # pick
    f"{ADDRESS_BYTES}sdqdB"        # candidate a: address, cost, in-flight, weight, state
    f"{ADDRESS_BYTES}sdqdB"        # candidate b
    f"{ADDRESS_BYTES}s{ADDRESS_BYTES}s"  # the first two ejected endpoints
)
FIELDS = ("time", "latency", "status", "attempt", "flags", "service", "route", "outcome",
          "error", "no_retry", "mode", "endpoints", "ejected", "candidates", "pick_state",
          "pick", "a_address", "a_cost", "a_inflight", "a_weight", "a_state",
          "b_address", "b_cost", "b_inflight", "b_weight", "b_state", "ejected_1",
          "ejected_2")
RECORD_SIZE = -(-(8 + BODY.size) // 64) * 64   # whole 64-byte lines
FILE_SIZE = HEADER_SIZE + CAPACITY * RECORD_SIZE
FLAG_RETRIED = 1

# How the pick was made (the record's mode).
MODES = ("p2c", "single", "probe", "round_robin", "consistent_hash")
MODE_P2C, MODE_SINGLE, MODE_PROBE, MODE_ROUND_ROBIN, MODE_HASH = range(len(MODES))
# An endpoint's state as the balancer saw it: meshd.balance.ejection.Health's values,
# then this worker's own failure-accrual trip, and an endpoint without a region row.
STATES = ("healthy", "ejected", "probing", "tripped", "no_row")
STATE_TRIPPED, STATE_NO_ROW = 3, 4

NO_CANDIDATE = (b"", 0.0, 0, 0.0, 0)   # an unused candidate's five fields
SEQLOCK_TRIES = 100


def ring_path(shm_dir: str, instance: str, master_pid: int, slot: int) -> str:
    return os.path.join(shm_dir, f"meshd-{instance}-{master_pid}-w{slot}.dec")


def create(path: str, slot: int, pid: int, generation: int) -> mmap.mmap:
    """A fresh ring file at ``path`` (replacing the previous occupant's), mapped for
    writing. Its pages are allocated now, so a full tmpfs fails here (OSError), not
    with SIGBUS on the request path."""
    fd, tmp = create_temp(path)
    try:
        os.ftruncate(fd, FILE_SIZE)
        os.posix_fallocate(fd, 0, FILE_SIZE)
        mm = mmap.mmap(fd, FILE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        _HEADER.pack_into(mm, 0, MAGIC, VERSION, RECORD_SIZE, CAPACITY, slot, pid,
                          generation, 0, 0)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        os.close(fd)
    return mm


@dataclass(frozen=True, slots=True)
class Ring:
    """What a reader found in one worker's file: its header and its whole records,
    newest first (each as a dict of FIELDS plus ``seq``)."""

    slot: int
    pid: int
    generation: int
    written: int
    dropped: int     # access log lines the worker dropped
    records: list[dict[str, Any]]


def read(path: str, uid: int | None = None, service: bytes | None = None) -> Ring | None:
    """The ring at ``path``; None when there is none (the slot holds no worker, or it
    has not created its file yet) or it is not a ring of this format. With ``service``
    (encoded), only that service's records."""
    try:
        fd = open_trusted(path, os.O_RDONLY, uid)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size != FILE_SIZE:
            return None
        mm = mmap.mmap(fd, FILE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        return parse(mm, service)
    finally:
        mm.close()


def parse(buf: Any, service: bytes | None = None) -> Ring | None:
    """The records of a ring held in ``buf`` (a mapping being written, or bytes)."""
    (magic, version, size, capacity, slot, pid, generation, written,
     dropped) = _HEADER.unpack_from(buf, 0)
    if magic != MAGIC or version != VERSION or size != RECORD_SIZE or capacity != CAPACITY:
        return None
    view = memoryview(buf)
    seqs = view.cast("B").cast("Q")
    key = None if service is None else service[:SERVICE_BYTES]
    found: list[dict[str, Any]] = []
    try:
        for i in range(CAPACITY):
            off = HEADER_SIZE + i * RECORD_SIZE
            rec = _copy(view, seqs, off)
            if rec is None:
                continue
            seq, body = rec
            values = BODY.unpack(body)
            if key is not None and values[5].rstrip(b"\0") != key:
                continue
            found.append(_record(seq, values))
    finally:
        seqs.release()
        view.release()
    found.sort(key=lambda r: r["seq"], reverse=True)
    return Ring(slot, pid, generation, written, dropped, found)


def read_header(path: str, uid: int | None = None) -> tuple[int, int, int] | None:
    """(slot, pid, access log lines dropped) of the ring at ``path``, its records left
    unread; None when there is none."""
    try:
        fd = open_trusted(path, os.O_RDONLY, uid)
    except OSError:
        return None
    try:
        head = os.pread(fd, HEADER_SIZE, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(head) < HEADER_SIZE:
        return None
    (magic, version, size, capacity, slot, pid, _generation, _written,
     dropped) = _HEADER.unpack_from(head, 0)
    if magic != MAGIC or version != VERSION or size != RECORD_SIZE or capacity != CAPACITY:
        return None
    return slot, pid, dropped


def _copy(view: memoryview, seqs: memoryview, off: int) -> tuple[int, bytes] | None:
    """(seq, body) of the record at ``off``, copied between two equal even reads of its
    seq; None when it was never written, is being written, or was left torn."""
    idx = off // 8
    for _ in range(SEQLOCK_TRIES):
        before = seqs[idx]
        if before == 0 or before & 1:
            return None   # empty, or odd: being written now, or torn for good
        body = bytes(view[off + 8:off + 8 + BODY.size])
        if seqs[idx] == before:
            return before, body
    return None


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", "replace")


def _record(seq: int, values: tuple[Any, ...]) -> dict[str, Any]:
    f = dict(zip(FIELDS, values, strict=True))
    for name in ("service", "route", "outcome", "error", "no_retry", "pick", "a_address",
                 "b_address", "ejected_1", "ejected_2"):
        f[name] = _text(f[name])
    f["seq"] = seq
    return f


def mode_name(code: int) -> str:
    return MODES[code] if 0 <= code < len(MODES) else str(code)


def state_name(code: int) -> str:
    return STATES[code] if 0 <= code < len(STATES) else str(code)
