"""The shared-memory region: the only module that knows its bytes.

One file (``{shm_dir}/meshd-{instance}.shm``, tmpfs by default) is created by the master
before it forks, mapped by every worker and by the control process, and may be attached
read-only by the CLI. Names never live here: rows are numbers that the endpoint snapshot
(see ``meshd.snapshot``) maps to (listener, service) pairs. All integers are little
endian; every field is 8-byte aligned so that a single writer's stores are never torn.

Layout, byte by byte::

    offset  size  field                     writer
    ------  ----  ------------------------  ---------------------------------------------
    0       8     magic  b"MESHDSHM"         master (once)
    8       4     layout version (u32)       master (once)  -- readers refuse another
    12      4     header size (u32) = 128    master (once)
    16      8     total size (u64)           master (once)
    24      8     config generation (u64)    master: bumped by every accepted reload
    32      4     worker slots (u32)         master (once)
    36      4     metric rows (u32)          master (once)
    40      4     desired workers (u32)      master: TTIN/TTOU
    44      4     master pid (u32)           master
    48      8     started at (f64, unix s)   master (once)
    56      8     reloads total (u64)        master: accepted HUP reloads
    64      8     reload failures (u64)      master: rejected HUP reloads
    72      8     worker restarts (u64)      master: workers replaced after dying
    80      8     rows exhausted (u64)       control: (listener, service) pairs that got no row
    88      40    reserved (zero)

    128     64 x slots   worker table, one 64-byte record per slot:
            +0  pid (i64; 0 = free)          master writes on spawn and clears on reap
            +8  heartbeat (f64, CLOCK_MONOTONIC seconds)   the process in the slot
            +16 generation (u64)             master on spawn
            +24 state (u64): 0 free, 1 booting, 2 serving, 3 draining   the process
            +32 kind (u64): 1 worker, 2 control              master on spawn
            +40 started (f64, CLOCK_MONOTONIC)              master on spawn
            +48 16 reserved

    then    slots x rows x FIELDS x 8   counter stripes: stripe s, row r, field f at
            STRIPES + ((s * rows + r) * FIELDS + f) * 8 (u64). Only the process in slot s
            writes stripe s. Counters are cumulative for the slot, across the processes
            that occupy it over time, so they survive reloads and restarts and never go
            backwards; gauges (the OPEN field) are zeroed by the master when it reaps the
            slot's process.

Row 0 counts requests that matched no service, row 1 those whose (listener, service) pair
found no free row (the region is full: ``rows exhausted`` says how often, and the control
process logs it). A reader combines a row by summing it over all stripes.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

from meshd.errors import ShmError

MAGIC = b"MESHDSHM"
VERSION = 1
HEADER_SIZE = 128
SLOT_SIZE = 64

_HEADER = struct.Struct("<8sIIQQIIIIdQQQQ")
_SLOT = struct.Struct("<qdQQQd")

# Header field offsets (bytes), for single-field reads and writes.
OFF_GENERATION = 24
OFF_DESIRED = 40
OFF_MASTER_PID = 44
OFF_RELOADS = 56
OFF_RELOAD_FAILURES = 64
OFF_RESTARTS = 72
OFF_ROWS_EXHAUSTED = 80

STATE_FREE, STATE_BOOTING, STATE_SERVING, STATE_DRAINING = 0, 1, 2, 3
KIND_WORKER, KIND_CONTROL = 1, 2

ROW_UNKNOWN = 0
ROW_OVERFLOW = 1
FIRST_ROW = 2

# Response status codes that get their own counter; any other falls in its class field.
STATUS_CODES = (
    200, 201, 202, 204, 206, 301, 302, 304, 307, 308, 400, 401, 403, 404, 405,
    408, 409, 413, 414, 429, 431, 500, 501, 502, 503, 504,
)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
# Latency histogram bounds in milliseconds (Linkerd2's), then +Inf.
LATENCY_BUCKETS_MS = (
    1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500, 1000, 2000, 3000,
    4000, 5000, 10000, 20000, 30000, 40000, 50000,
)

# Field indexes within a row.
F_REQUESTS = 0
F_STATUS = 1                                   # len(STATUS_CODES) fields
F_CLASS = F_STATUS + len(STATUS_CODES)         # len(STATUS_CLASSES) fields
F_LATENCY = F_CLASS + len(STATUS_CLASSES)      # len(LATENCY_BUCKETS_MS) + 1 fields
F_LATENCY_SUM_US = F_LATENCY + len(LATENCY_BUCKETS_MS) + 1
F_TCP_OPEN_TOTAL = F_LATENCY_SUM_US + 1
F_TCP_CLOSE_TOTAL = F_TCP_OPEN_TOTAL + 1
F_TCP_OPEN = F_TCP_CLOSE_TOTAL + 1             # gauge
F_READ_BYTES = F_TCP_OPEN + 1
F_WRITE_BYTES = F_READ_BYTES + 1
F_FAILURES = F_WRITE_BYTES + 1                 # responses classified as failures
FIELDS = 72                                    # 8 spare for later counters
assert F_FAILURES < FIELDS

GAUGE_FIELDS = (F_TCP_OPEN,)

_STATUS_FIELD = {code: F_STATUS + i for i, code in enumerate(STATUS_CODES)}


def status_field(status: int) -> int:
    """The field counting responses with this status code."""
    field = _STATUS_FIELD.get(status)
    if field is not None:
        return field
    klass = min(max(status // 100, 1), 5)
    return F_CLASS + klass - 1


def latency_field(ms: float) -> int:
    """The histogram field for a latency in milliseconds (the first bound >= ms)."""
    return F_LATENCY + bisect.bisect_left(LATENCY_BUCKETS_MS, ms)


def slot_count_for(workers: int) -> int:
    """Slots needed: two generations of workers overlap during a reload, plus controls."""
    return max(16, 2 * workers + 8)


def region_size(slots: int, rows: int) -> int:
    return HEADER_SIZE + slots * SLOT_SIZE + slots * rows * FIELDS * 8


@dataclass(frozen=True, slots=True)
class SlotRecord:
    index: int
    pid: int
    heartbeat: float
    generation: int
    state: int
    kind: int
    started: float


class Region:
    """A mapped region. Create with :meth:`create`, attach with :meth:`attach`."""

    def __init__(self, path: str, mm: mmap.mmap, writable: bool) -> None:
        self.path = path
        self._mm = mm
        self.writable = writable
        magic, version, header_size, total, *_rest = _HEADER.unpack_from(mm, 0)
        if magic != MAGIC:
            raise ShmError(f"{path}: not a meshd region (bad magic)")
        if version != VERSION:
            raise ShmError(f"{path}: layout version {version}, this meshd reads {VERSION}")
        if header_size != HEADER_SIZE or total != len(mm):
            raise ShmError(f"{path}: header says a {header_size}-byte header and {total} bytes "
                           f"in all; expected a {HEADER_SIZE}-byte header, and the file has "
                           f"{len(mm)} bytes")
        self.slots = struct.unpack_from("<I", mm, 32)[0]
        self.rows = struct.unpack_from("<I", mm, 36)[0]
        self.stripes_offset = HEADER_SIZE + self.slots * SLOT_SIZE
        self._q = memoryview(mm).cast("B").cast("Q") if writable else None
        self._stride = self.rows * FIELDS

    # -- life cycle ---------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, slots: int, rows: int) -> Region:
        """Create a fresh region at ``path`` (replacing any file there; processes that
        still map the old file keep their own copy of it)."""
        if rows < FIRST_ROW + 1:
            raise ShmError(f"metric rows must be at least {FIRST_ROW + 1}")
        size = region_size(slots, rows)
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        _HEADER.pack_into(mm, 0, MAGIC, VERSION, HEADER_SIZE, size, 0, slots, rows, 0,
                          os.getpid(), time.time(), 0, 0, 0, 0)
        os.rename(tmp, path)
        return cls(path, mm, writable=True)

    @classmethod
    def attach(cls, path: str, writable: bool = False) -> Region:
        try:
            fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        except OSError as e:
            raise ShmError(f"{path}: cannot open shared memory: {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                raise ShmError(f"{path}: too small to be a meshd region")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)
        return cls(path, mm, writable)

    def close(self) -> None:
        if self._q is not None:
            self._q.release()
            self._q = None
        self._mm.close()

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    # -- header -------------------------------------------------------------------------

    def get_u64(self, offset: int) -> int:
        return int(struct.unpack_from("<Q", self._mm, offset)[0])

    def set_u64(self, offset: int, value: int) -> None:
        struct.pack_into("<Q", self._mm, offset, value)

    def add_u64(self, offset: int, n: int = 1) -> None:
        self.set_u64(offset, self.get_u64(offset) + n)

    def get_u32(self, offset: int) -> int:
        return int(struct.unpack_from("<I", self._mm, offset)[0])

    def set_u32(self, offset: int, value: int) -> None:
        struct.pack_into("<I", self._mm, offset, value)

    @property
    def started_at(self) -> float:
        return float(struct.unpack_from("<d", self._mm, 48)[0])

    # -- worker table -------------------------------------------------------------------

    def _slot_offset(self, index: int, write: bool = False) -> int:
        if write and not self.writable:
            raise ShmError(f"{self.path}: attached read-only")
        if not 0 <= index < self.slots:
            raise IndexError(index)
        return HEADER_SIZE + index * SLOT_SIZE

    def read_slot(self, index: int) -> SlotRecord:
        pid, hb, gen, state, kind, started = _SLOT.unpack_from(self._mm, self._slot_offset(index))
        return SlotRecord(index, pid, hb, gen, state, kind, started)

    def slots_in_use(self) -> Iterator[SlotRecord]:
        for i in range(self.slots):
            rec = self.read_slot(i)
            if rec.pid:
                yield rec

    def claim_slot(self, index: int, generation: int, kind: int) -> None:
        """Master, before fork: reserve the slot (pid -1 until ``set_pid``). Written
        before the child exists so the child's own heartbeat and state are never
        overwritten by the master."""
        now = time.monotonic()
        _SLOT.pack_into(self._mm, self._slot_offset(index, True), -1, now, generation,
                        STATE_BOOTING, kind, now)

    def set_pid(self, index: int, pid: int) -> None:
        struct.pack_into("<q", self._mm, self._slot_offset(index, True), pid)

    def free_slot(self, index: int) -> None:
        """Master: the slot's process is gone. Zero its gauges, keep its counters."""
        off = self._slot_offset(index, True)
        self._mm[off:off + SLOT_SIZE] = bytes(SLOT_SIZE)
        q = self._require_writable()
        base = index * self._stride
        for row in range(self.rows):
            for field in GAUGE_FIELDS:
                q[self._stripes_base + base + row * FIELDS + field] = 0

    def heartbeat(self, index: int, state: int | None = None) -> None:
        """The slot's own process: I am alive (and, optionally, in this state)."""
        off = self._slot_offset(index, True)
        struct.pack_into("<d", self._mm, off + 8, time.monotonic())
        if state is not None:
            struct.pack_into("<Q", self._mm, off + 24, state)

    # -- counters -----------------------------------------------------------------------

    @property
    def _stripes_base(self) -> int:
        return self.stripes_offset // 8

    def _require_writable(self) -> memoryview:
        if self._q is None:
            raise ShmError(f"{self.path}: attached read-only")
        return self._q

    def stripe(self, index: int) -> Stripe:
        """The counters a process in slot ``index`` writes."""
        if not 0 <= index < self.slots:
            raise IndexError(index)
        return Stripe(self._require_writable(), self._stripes_base + index * self._stride)

    def read_field(self, slot: int, row: int, field: int) -> int:
        """One counter of one stripe (tests and diagnostics; readers usually sum rows)."""
        off = self.stripes_offset + ((slot * self.rows + row) * FIELDS + field) * 8
        return int(struct.unpack_from("<Q", self._mm, off)[0])

    def row_totals(self, row: int) -> list[int]:
        """One row summed over every stripe (what the metrics report)."""
        if not 0 <= row < self.rows:
            raise IndexError(row)
        width = FIELDS * 8
        totals = [0] * FIELDS
        unpack = struct.Struct(f"<{FIELDS}Q").unpack_from
        for s in range(self.slots):
            off = self.stripes_offset + (s * self.rows + row) * width
            values = unpack(self._mm, off)
            totals = [a + b for a, b in zip(totals, values, strict=True)]
        return totals


class Stripe:
    """One process's counters: ``add(row, field, n)``. Not shared between processes."""

    __slots__ = ("_q", "_base")

    def __init__(self, q: memoryview, base: int) -> None:
        self._q = q
        self._base = base

    def add(self, row: int, field: int, n: int = 1) -> None:
        i = self._base + row * FIELDS + field
        self._q[i] += n

    def sub(self, row: int, field: int, n: int = 1) -> None:
        i = self._base + row * FIELDS + field
        self._q[i] -= n

    def record_response(self, row: int, status: int, latency_s: float, failure: bool) -> None:
        """Count one response: status, latency histogram and sum, classification."""
        q = self._q
        base = self._base + row * FIELDS
        q[base + status_field(status)] += 1
        ms = latency_s * 1000.0
        q[base + latency_field(ms)] += 1
        q[base + F_LATENCY_SUM_US] += int(latency_s * 1_000_000)
        if failure:
            q[base + F_FAILURES] += 1


def region_path(shm_dir: str, instance: str) -> str:
    return os.path.join(shm_dir, f"meshd-{instance}.shm")
