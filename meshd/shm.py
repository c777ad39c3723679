"""The shared-memory region: the only module that knows its bytes.

One file (``{shm_dir}/meshd-{instance}.shm``, tmpfs by default, mode 0600 in meshd's
private directory: see ``meshd.private_files``) is created by the master
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
    80      8     rows exhausted (u64)       control: (listener, service) pairs and endpoint
                                              addresses that got no row (each once per
                                              generation)
    88      4     endpoint rows (u32)        master (once)
    92      4     slots ever used (u32)      master on claim, and a process taking its stripe:
                                              1 + the highest slot index that may hold counts
                                              (only raised), so readers skip the rest
    96      4     metric rows in use (u32)   control: rows assigned (rows 0 and 1 included)
                                              plus (listener, service) pairs refused for
                                              want of a row -- what the region needs now
    100     4     endpoint rows in use (u32) control: endpoint rows assigned plus endpoints
                                              refused for want of a row
    104     8     layout fingerprint (u64)   master (once)  -- readers refuse another
    112     16    reserved (zero)

    128     64 x slots   worker table, one 64-byte record per slot:
            +0  pid (i64; 0 = free)          master writes on spawn and clears on reap
            +8  heartbeat (f64, CLOCK_MONOTONIC seconds)   the process in the slot
            +16 generation (u64)             master on spawn
            +24 state (u64): 0 free, 1 booting, 2 serving, 3 draining   the process
            +32 kind (u64): 1 worker, 2 control              master on spawn
            +40 started (f64, CLOCK_MONOTONIC)              master on spawn
            +48 open client connections (u64 gauge)     the worker (accept balancing)
            +56 snapshot_seq (u64: the endpoint snapshot sequence the worker loaded last)

    then    slots x rows x FIELDS x 8   counter stripes: stripe s, row r, field f at
            STRIPES + ((s * rows + r) * FIELDS + f) * 8 (u64). Only the process in slot s
            writes stripe s. Counters are cumulative for the slot, across the processes
            that occupy it over time, so they survive reloads and restarts and never go
            backwards; gauges (the OPEN field) are zeroed by the master when it reaps the
            slot's process.

    then    slots x endpoint rows x EP_FIELDS x 8   endpoint stripes: what each worker
            saw of each endpoint (the balancer's shared state). Stripe s, endpoint row e,
            field f at EP_STRIPES + ((s * endpoint_rows + e) * EP_FIELDS + f) * 8:
            +0 in-flight requests (i64 gauge)   +8 peak-EWMA RTT, seconds (f64)
            +16 EWMA stamp, CLOCK_MONOTONIC (f64)   +24 successes (u64)   +32 failures
            (u64)   +40 upstream connections in use (i64 gauge)   +48 this process's
            current run of consecutive failures (i64; the balancer sums the runs of all
            live workers for failure accrual)   +56..63 reserved. Only
            the process in slot s writes stripe s; the master zeroes a reaped slot's
            in-flight and connection gauges.

    then    endpoint rows x HEALTH_FIELDS x 8   health rows, written only by the control
            process (failure accrual), read by every worker: +0 state (0 healthy,
            1 ejected, 2 probing) +8 consecutive failures +16 ejections +24 until
            +32 since +40 prober slot, all f64 (meshd.balance.ejection's row), +48
            reserved, +56 sequence (u64, the row's seqlock: odd while being written).

    then    slots x CTL_ENTRIES x 16   control counter tables: slot s's table at
            CTL + s * CTL_ENTRIES * 16, entries of (key u64, value u64); key 0 is an
            empty entry. Only the process in slot s (a control process) writes table s.

Row 0 counts requests that matched no service, row 1 those whose (listener, service) pair
found no free row (the region is full: ``rows exhausted`` says how often, and the control
process logs it). A reader combines a row by summing it over all stripes.

Growth. The sizes are fixed for a file's life, but not for meshd's: on an accepted reload
the master sizes the next generation's region with :func:`grown_rows` from the config and
the two "in use" fields (the control process warns once usage passes 3/4: it will grow at
the next reload). A larger region is a new file, written at a temporary name beside the
old one and filled by :func:`copy_region` (header counters, worker table, every stripe row
by row, health rows: row indexes keep their meaning, only offsets move); the new
generation is forked with it, and it is renamed over ``{shm_dir}/meshd-{instance}.shm``
once that generation serves. The old generation keeps its own mapping while it drains.
Until the last process of a region is reaped the master copies each live process's slot
into the other live regions (:func:`copy_slot`), and the final stripe once more after the
reap: a slot has one writer, in one region, so its stripe in every other region is only
ever a copy, and overwriting the copy with the writer's values folds in its counts with
nothing lost or counted twice. Regions never shrink.

Protocol detection (``protocol = "auto"`` listeners) is counted in the F_DETECT fields,
one per entry of DETECT_RESULTS, and only in the listener's own row (service ""), which
the control process assigns to every listener at start; the fields stay zero in every
other row. Detection happens before any service is known, so there is nothing finer to
count it by, and extra fields in the existing stripe need no new section or index.
Adding them took FIELDS from 72 to 80: a region of the old size is refused on attach
("sections do not add up"), so it is never misread. TLS handshakes are counted the same
way, by result (TLS_RESULTS), inbound (F_TLS_IN, on the listener's own row) and outbound
(F_TLS_OUT, on the row of the request's listener and service); they took FIELDS to 104.
Authorization denials (``meshd_authz_denied_total``) are counted in the F_AUTHZ_DENIED
fields of the listener's own row, one per entry of AUTHZ_DENIED (protocol and mode).
gRPC responses (HTTP 200 with a grpc-status) are counted by that status in the F_GRPC
fields instead of F_STATUS's 200, and requests counted under a fixed label value
because a per-listener cap of authority or route rows was reached (``meshd.rowkeys``)
in the F_LABEL_OVERFLOW fields of the listener's own row; they took FIELDS to 128.
Version 8 used 6 of the 10 spare fields: F_WORKER (WORKER_COUNTS, on ROW_UNKNOWN: counts
workers used to report only to the control process) and F_UPSTREAM (UPSTREAM_EVENTS, on
the row of the request's listener and service).

Control counters. The control process counts things only it sees (discovery watch
errors, snapshot publish failures, refused fleet entries, admin connections closed,
identity materials, tap records received...). Kept in its memory they would start at
0 with every new control process (killed, or a reload's), which Prometheus reads as a
reset. They live in the control counter tables instead: a counter's key is
``counter_key`` of its rendered name and labels; the process in slot s adds to its own
table (one writer per table, as for stripes, and cumulative for the slot across the
processes that occupy it); readers sum a key over every used slot's table
(``ctl_total``). Two control processes alive at once (a reload's overlap) each count
what they saw. A table has CTL_ENTRIES entries and a key is looked for within
CTL_PROBES of its home: a key that finds no room stays in the process's memory
(``meshd.control.counters``), so only such a key can restart. The tables are copied
with the stripes (growth, ``copy_slot``).

Binary upgrade. A USR2's new master creates its own region. Before it does, it maps the
old master's (same VERSION and fingerprint; otherwise its counters start afresh, logged);
the new region is sized to hold every row of the old one, starts from its header
counters and health rows (:func:`inherit`), and reserves its first ``slots used`` slots
for the old master's processes: until the old master is gone the new master copies
those slots' stripes and tables into them (:func:`carry_slots`, gauges zeroed), once
more after it is gone, and only then hands the slots to its own processes (which add to
what is there). The new control process is seeded with the old master's snapshot, so
row r keeps its meaning. Counts the old master's processes made after its exit are
none; counts of a USR2 whose new master gives up are the old master's own.

Layout discipline. ``VERSION`` names the layout, and ``LAYOUT_FINGERPRINT`` (the first
8 bytes of a SHA-256 over ``LAYOUT``: every struct format, offset, field index and
counter table below) is written in the header and compared on attach, so a `meshd stat`
of another build refuses a region laid out differently ("layout fingerprint ...")
instead of summing the wrong bytes. tests/test_shm.py keeps the expected
(VERSION, fingerprint) pair: a layout change that does not bump VERSION and update the
pair fails there. Every offset has a name (OFF_* in the header, SLOT_* in a worker
record, EP_* and H_* field indexes); code outside this module reads endpoint and health
rows through :class:`EndpointView`.

Concurrent readers (DESIGN §2: seqlock, or why store order suffices), record by record:

- Health rows: seqlocked. A worker copies state, since and prober together to decide
  whether it holds a probe, and a transition rewrites them together (EJECTED -> PROBING
  grants slot p at time t; PROBING -> EJECTED clears it): a mixed copy could send a probe
  nobody was granted or miss one. The control process (the only writer) makes H_SEQ odd,
  writes the fields, makes it even; :meth:`EndpointView.health` copies the row between two
  equal even reads of H_SEQ (bounded retries; past the bound the reader acts as if the
  endpoint were ejected, never on a mixed copy). The fast path reads the state field alone
  (a single 8-byte load): HEALTHY rows, nearly all of them, never take the lock.
- Endpoint stripe rows: store order. Each field is read on its own and summed across
  stripes (in-flight, connections, successes, failures, the failure run): no invariant
  ties them, and a count one request behind is what any unlocked sum gives. The one pair
  read together is (EP_RTT, EP_STAMP); its writer stores the stamp, then the RTT. A mixed
  copy is the old RTT with the new stamp (decayed too little) or, across two updates,
  an RTT decayed from a stamp one sample old: either lies between the two valid
  estimates it straddles, and the value is only compared between two candidates by P2C
  and refreshed by the next response. A lock here would cost every request.
- Worker table records: store order. Kind, generation and started are written by the
  master while no process runs in the slot (before fork, which orders them, and zeroed
  after the reap); the pid is stored after them (set_pid after fork), so a reader that
  sees pid > 0 sees the claim. Heartbeat, state and connections have one writer (the
  slot's process) and are each meaningful alone. A reader racing a reap sees a record
  half zeroed: its kind or state no longer match what readers filter on, so the slot is
  skipped one read early, which is what the reap means.
- Header fields: single values, each with one writer (see the table above).

The stores and loads are CPython's memoryview item assignments, each one aligned 8-byte
machine store; the seqlock relies on the interpreter not reordering them (it executes
them in program order) and on x86-64's store order (TSO). On weakly ordered CPUs the
health row would need fences Python does not offer; meshd is built and tested on x86-64.
"""

from __future__ import annotations

import bisect
import hashlib
import mmap
import os
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from meshd.balance.ejection import EndpointHealth
from meshd.balance.ewma import DECAY, DEFAULT_RTT, seed
from meshd.balance.ewma import observed as ewma_observed
from meshd.errors import ShmError
from meshd.private_files import UntrustedFile, create_temp, open_trusted

MAGIC = b"MESHDSHM"
VERSION = 8  # 2: endpoint stripes and health rows; 3: fingerprint, health seqlock;
             # 4: the worker slot's snapshot_seq; 5: TLS handshake and authorization
             # denial counters, FIELDS 104; 6: [tracing]'s span counters; 7: gRPC
             # status and label overflow counters, FIELDS 128; 8: control counter
             # tables, worker counts and upstream events
HEADER_SIZE = 128
SLOT_SIZE = 64

_HEADER = struct.Struct("<8sIIQQIIIIdQQQQ")   # magic .. rows exhausted (offsets 0..87)
_SLOT = struct.Struct("<qdQQQdQQ")           # pid .. snapshot_seq (offsets 0..63)
_CTL_ENTRY = struct.Struct("<QQ")             # a control counter: key, value

# Header field offsets (bytes), for single-field reads and writes.
OFF_MAGIC = 0
OFF_VERSION = 8
OFF_HEADER_SIZE = 12
OFF_TOTAL_SIZE = 16
OFF_GENERATION = 24
OFF_SLOTS = 32
OFF_ROWS = 36
OFF_DESIRED = 40
OFF_MASTER_PID = 44
OFF_STARTED_AT = 48
OFF_RELOADS = 56
OFF_RELOAD_FAILURES = 64
OFF_RESTARTS = 72
OFF_ROWS_EXHAUSTED = 80
OFF_ENDPOINT_ROWS = 88
OFF_SLOTS_USED = 92
OFF_ROWS_USED = 96
OFF_ENDPOINT_ROWS_USED = 100
OFF_FINGERPRINT = 104

# Worker record field offsets (bytes, from the record's start).
SLOT_PID = 0
SLOT_HEARTBEAT = 8
SLOT_GENERATION = 16
SLOT_STATE = 24
SLOT_KIND = 32
SLOT_STARTED = 40
SLOT_CONNECTIONS = 48
SLOT_SNAPSHOT_SEQ = 56  # the snapshot sequence the worker loaded last (/ready waits on it)
# The two structs end where the named fields after them begin.
assert _HEADER.size == OFF_ENDPOINT_ROWS and _SLOT.size == SLOT_SIZE

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
F_RETRIES = F_FAILURES + 1                     # retries sent
F_BUDGET_EXHAUSTED = F_RETRIES + 1             # retries the budget refused
# Protocol detection on the listener's own row (service ""), one counter per result.
DETECT_RESULTS = ("http1", "h2", "tls", "opaque", "timeout", "skipped", "tunnel",
                  "tunnel_refused")
F_DETECT = F_BUDGET_EXHAUSTED + 1              # len(DETECT_RESULTS) fields
# TLS handshakes (mTLS between meshds, [listener.tls]), one counter per result: inbound
# on the listener's own row, outbound on the row of the call's (listener, service).
TLS_RESULTS = ("ok", "no_client_cert", "verify_failed", "bad_san", "error", "timeout",
               "plaintext_refused", "plaintext_permitted")
F_TLS_IN = F_DETECT + len(DETECT_RESULTS)      # len(TLS_RESULTS) fields
F_TLS_OUT = F_TLS_IN + len(TLS_RESULTS)        # len(TLS_RESULTS) fields
# Authorization denials (meshd.authz) on the listener's own row, by protocol and mode.
AUTHZ_DENIED = ("http_enforce", "http_audit", "tcp_enforce", "tcp_audit")
F_AUTHZ_DENIED = F_TLS_OUT + len(TLS_RESULTS)  # len(AUTHZ_DENIED) fields
# Spans of [tracing] on ROW_UNKNOWN (worker-wide, not per listener), by what became of them.
TRACE_COUNTS = ("exported", "dropped_queue_full", "dropped_export_failed")
F_TRACE = F_AUTHZ_DENIED + len(AUTHZ_DENIED)    # len(TRACE_COUNTS) fields
# gRPC responses (an HTTP 200 with a grpc-status) by their status code, 0..16, then any
# other code: counted here instead of F_STATUS's 200 (response_total's grpc_status label).
GRPC_CODES = 17
F_GRPC = F_TRACE + len(TRACE_COUNTS)           # GRPC_CODES + 1 fields
# Requests counted under a fixed label value because a per-listener cap was reached
# (meshd.rowkeys: MAX_AUTHORITY_ROWS, MAX_ROUTE_ROWS), on the listener's own row.
LABEL_OVERFLOW = ("authority", "route")
F_LABEL_OVERFLOW = F_GRPC + GRPC_CODES + 1     # len(LABEL_OVERFLOW) fields
# Worker-wide counts a worker used to report only to the control process (which lost
# them with a new control process), on ROW_UNKNOWN: access log lines dropped, tap
# records sent to the control process and dropped on the way.
WORKER_COUNTS = ("access_log_dropped", "tap_sent", "tap_dropped")
F_WORKER = F_LABEL_OVERFLOW + len(LABEL_OVERFLOW)  # len(WORKER_COUNTS) fields
# Upstream connection events, on the row of the (listener, service) whose request met
# them (meshd.worker.upstream): a peer meshd silent past ping_timeout, a request sent
# again because the peer refused its stream (REFUSED_STREAM or beyond a GOAWAY), an idle
# pooled connection closed by the reaper.
UPSTREAM_EVENTS = ("ping_timeout", "refused_retry", "idle_reaped")
F_UPSTREAM = F_WORKER + len(WORKER_COUNTS)     # len(UPSTREAM_EVENTS) fields
F_PING_TIMEOUT, F_REFUSED_RETRY, F_IDLE_REAPED = range(F_UPSTREAM, F_UPSTREAM + 3)
FIELDS = 128                                   # 4 spare for later counters
assert F_UPSTREAM + len(UPSTREAM_EVENTS) <= FIELDS

GAUGE_FIELDS = (F_TCP_OPEN,)

_STATUS_FIELD = {code: F_STATUS + i for i, code in enumerate(STATUS_CODES)}
_bisect_left = bisect.bisect_left


def status_field(status: int) -> int:
    """The field counting responses with this status code."""
    field = _STATUS_FIELD.get(status)
    if field is not None:
        return field
    klass = min(max(status // 100, 1), 5)
    return F_CLASS + klass - 1


def grpc_field(code: int) -> int:
    """The field counting gRPC responses with this grpc-status."""
    return F_GRPC + (code if 0 <= code < GRPC_CODES else GRPC_CODES)


def latency_field(ms: float) -> int:
    """The histogram field for a latency in milliseconds (the first bound >= ms)."""
    return F_LATENCY + bisect.bisect_left(LATENCY_BUCKETS_MS, ms)


def slot_count_for(workers: int) -> int:
    """Slots needed: two generations of workers overlap during a reload, plus controls."""
    return max(16, 2 * workers + 8)


EP_FIELDS = 8
EP_INFLIGHT, EP_RTT, EP_STAMP, EP_SUCCESSES, EP_FAILURES, EP_CONNS, EP_RUN = 0, 1, 2, 3, 4, 5, 6
HEALTH_FIELDS = 8
# Health row fields (8-byte units): meshd.balance.ejection's row, then the seqlock.
H_STATE, H_FAILURES, H_EJECTIONS, H_UNTIL, H_SINCE, H_PROBER = 0, 1, 2, 3, 4, 5
H_VALUES = 6           # fields of EndpointHealth.as_row
H_SEQ = 7              # u64 sequence: odd while the control process rewrites the row
SEQLOCK_TRIES = 1000   # a reader's bound; the writer holds a row for six stores
DEFAULT_ENDPOINT_ROWS = 256
# Control counter tables (see "Control counters" in the module docstring): per slot,
# CTL_ENTRIES entries of (key hash u64, value u64), open addressing, linear probing.
CTL_ENTRIES = 1024
CTL_PROBES = 64        # a key not found within this many entries: the table is full
_CTL_EMPTY = bytes(CTL_ENTRIES * 16)

# Everything the bytes' meaning depends on. Change any of it and the fingerprint moves:
# bump VERSION and the pair in tests/test_shm.py with it.
LAYOUT: tuple[object, ...] = (
    ("header", HEADER_SIZE, _HEADER.format, tuple(sorted(
        (k, v) for k, v in globals().items() if k.startswith("OFF_")))),
    ("slot", SLOT_SIZE, _SLOT.format, tuple(sorted(
        (k, v) for k, v in globals().items() if k.startswith("SLOT_") and k != "SLOT_SIZE"))),
    ("row", FIELDS, STATUS_CODES, STATUS_CLASSES, LATENCY_BUCKETS_MS, DETECT_RESULTS, TLS_RESULTS,
     AUTHZ_DENIED, TRACE_COUNTS, GRPC_CODES, LABEL_OVERFLOW, WORKER_COUNTS, UPSTREAM_EVENTS,
     tuple(sorted((k, v) for k, v in globals().items()
                  if k.startswith("F_") and isinstance(v, int)))),
    ("endpoint", EP_FIELDS, (EP_INFLIGHT, EP_RTT, EP_STAMP, EP_SUCCESSES, EP_FAILURES,
                             EP_CONNS, EP_RUN), "qddQQqq8x"),
    ("health", HEALTH_FIELDS, (H_STATE, H_FAILURES, H_EJECTIONS, H_UNTIL, H_SINCE, H_PROBER,
                               H_SEQ), H_VALUES, "dddddd8xQ"),
    ("control", CTL_ENTRIES, CTL_PROBES, "QQ", "blake2b-8"),
    ("sections", "header", "slots", "stripes", "endpoint stripes", "health rows",
     "control tables"),
)
LAYOUT_FINGERPRINT = int.from_bytes(hashlib.sha256(repr(LAYOUT).encode()).digest()[:8], "little")


def region_size(slots: int, rows: int, endpoint_rows: int = DEFAULT_ENDPOINT_ROWS) -> int:
    return (HEADER_SIZE + slots * SLOT_SIZE + slots * rows * FIELDS * 8
            + slots * endpoint_rows * EP_FIELDS * 8 + endpoint_rows * HEALTH_FIELDS * 8
            + slots * CTL_ENTRIES * 16)


def counter_key(name: str) -> int:
    """The 8-byte key of a control counter: a hash of its name and labels as rendered
    (``meshd_discovery_errors_total{service="web",source="consul"}``); never 0 (empty)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") or 1


@dataclass(frozen=True, slots=True)
class SlotRecord:
    index: int
    pid: int
    heartbeat: float
    generation: int
    state: int
    kind: int
    started: float
    connections: int = 0  # open client connections (a worker's, for accept balancing)
    # The seq of the endpoint snapshot the worker has loaded (0: none yet). Tests and
    # /ready wait for it instead of sleeping a poll interval or two.
    snapshot_seq: int = 0


class Region:
    """A mapped region. Create with :meth:`create`, attach with :meth:`attach`."""

    def __init__(self, path: str, mm: mmap.mmap, writable: bool) -> None:
        self.path = path
        self._mm = mm
        self.writable = writable
        magic, version, header_size, total, *_rest = _HEADER.unpack_from(mm, OFF_MAGIC)
        if magic != MAGIC:
            raise ShmError(f"{path}: not a meshd region (bad magic)")
        if version != VERSION:
            raise ShmError(f"{path}: layout version {version}, this meshd reads {VERSION} "
                           "(a different meshd release wrote it)")
        fingerprint = struct.unpack_from("<Q", mm, OFF_FINGERPRINT)[0]
        if fingerprint != LAYOUT_FINGERPRINT:
            raise ShmError(f"{path}: layout fingerprint {fingerprint:016x}, this meshd reads "
                           f"{LAYOUT_FINGERPRINT:016x} (a meshd built from other sources "
                           "wrote it)")
        if header_size != HEADER_SIZE or total != len(mm):
            raise ShmError(f"{path}: header says a {header_size}-byte header and {total} bytes "
                           f"in all; expected a {HEADER_SIZE}-byte header, and the file has "
                           f"{len(mm)} bytes")
        self.slots = struct.unpack_from("<I", mm, OFF_SLOTS)[0]
        self.rows = struct.unpack_from("<I", mm, OFF_ROWS)[0]
        self.stripes_offset = HEADER_SIZE + self.slots * SLOT_SIZE
        self.endpoint_rows = struct.unpack_from("<I", mm, OFF_ENDPOINT_ROWS)[0]
        self.ep_offset = self.stripes_offset + self.slots * self.rows * FIELDS * 8
        self.health_offset = self.ep_offset + self.slots * self.endpoint_rows * EP_FIELDS * 8
        self.ctl_offset = self.health_offset + self.endpoint_rows * HEALTH_FIELDS * 8
        if self.ctl_offset + self.slots * CTL_ENTRIES * 16 != len(mm):
            raise ShmError(f"{path}: sections do not add up to the file size")
        # Typed views over the whole map (8-byte fields): integers and floats.
        self._qr = memoryview(mm).cast("B").cast("q")
        self._dr: Any = memoryview(mm).cast("B").cast("d")
        self._q = memoryview(mm).cast("B").cast("Q") if writable else None
        self._stride = self.rows * FIELDS

    # -- life cycle ---------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, slots: int, rows: int,
               endpoint_rows: int = DEFAULT_ENDPOINT_ROWS, publish: bool = True) -> Region:
        """Create a fresh region at ``path`` (replacing any file there; processes that
        still map the old file keep their own copy of it).

        With ``publish=False`` the file stays at its unique temporary name beside
        ``path`` (``region.path``) until :meth:`publish`: a grown region is filled and
        handed to a new generation before readers by name may see it."""
        if rows < FIRST_ROW + 1:
            raise ShmError(f"metric rows must be at least {FIRST_ROW + 1}")
        size = region_size(slots, rows, endpoint_rows)
        # Unique, never truncating: an unpublished region still mapped must not be clobbered.
        # Exclusive and 0600: the counters are the mesh's traffic (meshd.private_files).
        fd, tmp = create_temp(path)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        _HEADER.pack_into(mm, OFF_MAGIC, MAGIC, VERSION, HEADER_SIZE, size, 0, slots, rows, 0,
                          os.getpid(), time.time(), 0, 0, 0, 0)
        struct.pack_into("<I", mm, OFF_ENDPOINT_ROWS, endpoint_rows)
        struct.pack_into("<Q", mm, OFF_FINGERPRINT, LAYOUT_FINGERPRINT)
        region = cls(tmp, mm, writable=True)
        if publish:
            region.publish(path)
        return region

    def publish(self, path: str) -> None:
        """Rename the file over ``path``, where readers (the CLI) look for it."""
        os.rename(self.path, path)
        self.path = path

    def reserve(self, ranges: list[tuple[int, int]]) -> None:
        """Allocate the pages of these (offset, length) ranges now, so that filling them
        fails here with a clear error instead of SIGBUS when tmpfs is full."""
        fd = open_trusted(self.path, os.O_RDWR)
        try:
            for offset, length in ranges:
                if length > 0:
                    os.posix_fallocate(fd, offset, length)
        except OSError as e:
            raise ShmError(f"{self.path}: cannot allocate {len(self._mm)} bytes of shared "
                           f"memory: {e.strerror}") from None
        finally:
            os.close(fd)

    @classmethod
    def attach(cls, path: str, writable: bool = False, uid: int | None = None) -> Region:
        """Map the region at ``path``, once it proves to be a file of ``uid`` (default:
        this process's) that no one else can write: a region another user planted is
        refused (ShmError), never read."""
        try:
            fd = open_trusted(path, os.O_RDWR if writable else os.O_RDONLY, uid)
        except OSError as e:
            raise ShmError(str(e) if isinstance(e, UntrustedFile)
                           else f"{path}: cannot open shared memory: {e.strerror}") from None
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
        self._qr.release()
        self._dr.release()
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
    def rows_used(self) -> int:
        """Metric rows in use, as the control process published them."""
        return self.get_u32(OFF_ROWS_USED)

    @property
    def endpoint_rows_used(self) -> int:
        """Endpoint rows in use, as the control process published them."""
        return self.get_u32(OFF_ENDPOINT_ROWS_USED)

    def publish_usage(self, rows: int | None = None, endpoint_rows: int | None = None) -> None:
        """Control process: how many rows its tables use (read by the master on reload)."""
        if rows is not None:
            self.set_u32(OFF_ROWS_USED, min(rows, 0xFFFFFFFF))
        if endpoint_rows is not None:
            self.set_u32(OFF_ENDPOINT_ROWS_USED, min(endpoint_rows, 0xFFFFFFFF))

    @property
    def started_at(self) -> float:
        return float(struct.unpack_from("<d", self._mm, OFF_STARTED_AT)[0])

    # -- worker table -------------------------------------------------------------------

    def _slot_offset(self, index: int, write: bool = False) -> int:
        if write and not self.writable:
            raise ShmError(f"{self.path}: attached read-only")
        if not 0 <= index < self.slots:
            raise IndexError(index)
        return HEADER_SIZE + index * SLOT_SIZE

    def read_slot(self, index: int) -> SlotRecord:
        return SlotRecord(index, *_SLOT.unpack_from(self._mm, self._slot_offset(index)))

    def slots_in_use(self) -> Iterator[SlotRecord]:
        for i in range(self.get_u32(OFF_SLOTS_USED)):  # slots past it were never claimed
            rec = self.read_slot(i)
            if rec.pid:
                yield rec

    def claim_slot(self, index: int, generation: int, kind: int) -> None:
        """Master, before fork: reserve the slot (pid -1 until ``set_pid``). Written
        before the child exists so the child's own heartbeat and state are never
        overwritten by the master."""
        now = time.monotonic()
        _SLOT.pack_into(self._mm, self._slot_offset(index, True), -1, now, generation,
                        STATE_BOOTING, kind, now, 0, 0)
        self._mark_used(index)

    def _mark_used(self, index: int) -> None:
        if index >= self.get_u32(OFF_SLOTS_USED):
            self.set_u32(OFF_SLOTS_USED, index + 1)

    def set_pid(self, index: int, pid: int) -> None:
        struct.pack_into("<q", self._mm, self._slot_offset(index, True) + SLOT_PID, pid)

    def free_slot(self, index: int) -> None:
        """Master: the slot's process is gone. Zero its gauges, keep its counters."""
        off = self._slot_offset(index, True)
        self._mm[off:off + SLOT_SIZE] = bytes(SLOT_SIZE)
        q = self._require_writable()
        base = index * self._stride
        for row in range(self.rows):
            for field in GAUGE_FIELDS:
                q[self._stripes_base + base + row * FIELDS + field] = 0
        ep_base = self.ep_offset // 8 + index * self.endpoint_rows * EP_FIELDS
        for row in range(self.endpoint_rows):
            self._qr[ep_base + row * EP_FIELDS + EP_INFLIGHT] = 0
            self._qr[ep_base + row * EP_FIELDS + EP_CONNS] = 0

    def set_open_connections(self, index: int, n: int) -> None:
        """The slot's own worker: how many client connections it serves now."""
        struct.pack_into("<Q", self._mm, self._slot_offset(index, True) + SLOT_CONNECTIONS, n)

    def set_snapshot_seq(self, index: int, seq: int) -> None:
        """The slot's own worker: the endpoint snapshot it serves from now."""
        struct.pack_into("<Q", self._mm, self._slot_offset(index, True) + SLOT_SNAPSHOT_SEQ, seq)

    def fewest_connections(self, me: int, generation: int) -> int | None:
        """The fewest client connections any other serving worker of ``generation``
        holds (None: no such worker). Read by a worker deciding whether to leave a
        pending connection to a less loaded sibling."""
        return min((r.connections for r in self.slots_in_use()
                    if r.index != me and r.pid > 0 and r.generation == generation
                    and r.state == STATE_SERVING and r.kind == KIND_WORKER), default=None)

    def heartbeat(self, index: int, state: int | None = None) -> None:
        """The slot's own process: I am alive (and, optionally, in this state)."""
        off = self._slot_offset(index, True)
        struct.pack_into("<d", self._mm, off + SLOT_HEARTBEAT, time.monotonic())
        if state is not None:
            struct.pack_into("<Q", self._mm, off + SLOT_STATE, state)

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
        self._require_writable()
        self._mark_used(index)
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
        for s in range(self.get_u32(OFF_SLOTS_USED)):  # never-claimed stripes hold zeros
            off = self.stripes_offset + (s * self.rows + row) * width
            values = unpack(self._mm, off)
            totals = [a + b for a, b in zip(totals, values, strict=True)]
        return totals

    # -- control counters (see "Control counters" in the module docstring) -------------

    def _ctl_find(self, slot: int, key: int, insert: bool) -> int | None:
        """Index (8-byte units) of ``key``'s entry in ``slot``'s table; with ``insert``, an
        empty entry is taken for it. None: not there (or no room within CTL_PROBES)."""
        q = self._qr
        base = self.ctl_offset // 8 + slot * CTL_ENTRIES * 2
        start = key % CTL_ENTRIES
        for i in range(CTL_PROBES):
            at = base + ((start + i) % CTL_ENTRIES) * 2
            held = q[at] & 0xFFFFFFFFFFFFFFFF
            if held == key:
                return at
            if held == 0:
                if not insert:
                    return None
                q[at + 1] = 0
                q[at] = key - (1 << 64) if key >= 1 << 63 else key   # the q view is signed
                return at
        return None

    def ctl_add(self, slot: int, key: int, n: int = 1) -> bool:
        """The process in ``slot`` counts ``n`` more under ``key`` (``counter_key``).
        False: the slot's table has no room for a new key (the caller keeps it)."""
        if not self.writable:
            raise ShmError(f"{self.path}: attached read-only")
        if not 0 <= slot < self.slots:
            raise IndexError(slot)
        at = self._ctl_find(slot, key, True)
        if at is None:
            return False
        self._qr[at + 1] += n
        self._mark_used(slot)
        return True

    def ctl_totals(self) -> dict[int, int]:
        """Every control counter, summed over every used slot's table, in one pass (what
        a /metrics render reads: one dict lookup per series)."""
        totals: dict[int, int] = {}
        size = CTL_ENTRIES * 16
        for s in range(min(self.get_u32(OFF_SLOTS_USED), self.slots)):
            at = self.ctl_offset + s * size
            table = self._mm[at:at + size]
            if table == _CTL_EMPTY:   # a worker's slot: nothing to look at
                continue
            for key, value in _CTL_ENTRY.iter_unpack(table):
                if key:
                    totals[key] = totals.get(key, 0) + value
        return totals

    def ctl_total(self, key: int) -> int:
        """A control counter summed over every used slot's table."""
        total = 0
        q = self._qr
        for s in range(min(self.get_u32(OFF_SLOTS_USED), self.slots)):
            at = self._ctl_find(s, key, False)
            if at is not None:
                total += q[at + 1]
        return total


    # -- endpoints (the balancer's shared state) -----------------------------------------

    def ep_stripe(self, slot: int) -> EndpointStripe:
        """What the process in ``slot`` writes about endpoints."""
        if not self.writable:
            raise ShmError(f"{self.path}: attached read-only")
        if not 0 <= slot < self.slots:
            raise IndexError(slot)
        return EndpointStripe(self._qr, self._dr,
                              self.ep_offset // 8 + slot * self.endpoint_rows * EP_FIELDS)

    def ep_read(self, slot: int, row: int) -> tuple[int, float, float, int, int]:
        """(in-flight, rtt, stamp, successes, failures) of one stripe's endpoint row."""
        i = self.ep_index(slot, row)
        q, d = self._qr, self._dr
        return q[i], d[i + EP_RTT], d[i + EP_STAMP], q[i + EP_SUCCESSES], q[i + EP_FAILURES]

    def ep_index(self, slot: int, row: int) -> int:
        """Index of an endpoint row's first field in ``views`` (8-byte units)."""
        return self.ep_offset // 8 + (slot * self.endpoint_rows + row) * EP_FIELDS

    def health(self, row: int) -> tuple[float, ...] | None:
        """The health row's six values (``EndpointHealth.as_row``), copied under its
        seqlock (None: see :meth:`EndpointView.health_values`)."""
        return self.endpoint_view().health_values(row)

    def health_index(self, row: int) -> int:
        return self.health_offset // 8 + row * HEALTH_FIELDS

    def set_health(self, row: int, values: tuple[float, ...]) -> None:
        """Control process only (the row's one writer): the values under the row's
        seqlock (odd sequence, the fields, even sequence)."""
        if not self.writable:
            raise ShmError(f"{self.path}: attached read-only")
        i = self.health_index(row)
        q, d = self._qr, self._dr
        q[i + H_SEQ] += 1
        for k in range(min(len(values), H_VALUES)):
            d[i + k] = float(values[k])
        q[i + H_SEQ] += 1

    def endpoint_view(self) -> EndpointView:
        """Readers' access to endpoint stripes and health rows (the balancer's)."""
        return EndpointView(self._qr, self._dr, self.ep_offset // 8,
                            self.endpoint_rows * EP_FIELDS, self.health_offset // 8)


class EndpointView:
    """What every process may read of the endpoints: one field summed over stripes, the
    stripes' EWMA states, a health row's state alone (no lock) or whole (seqlocked).
    Indexes are computed here only; ``row`` is an endpoint row, ``slots`` stripe indexes."""

    __slots__ = ("_q", "_d", "_ep", "_per_slot", "_health")

    def __init__(self, q: memoryview, d: Any, ep_base: int, per_slot: int,
                 health_base: int) -> None:
        self._q: memoryview = q
        self._d: Any = d
        self._ep = ep_base
        self._per_slot = per_slot
        self._health = health_base

    def field_sum(self, row: int, field: int, slots: list[int]) -> int:
        """An integer field of the endpoint of ``row``, summed over ``slots``' stripes."""
        q, per_slot = self._q, self._per_slot
        base = self._ep + row * EP_FIELDS + field
        return sum(q[base + slot * per_slot] for slot in slots)

    def ewma_states(self, row: int, slots: list[int]) -> tuple[list[tuple[float, float]], int]:
        """Each of ``slots``' peak-EWMA state of the endpoint of ``row``, as (rtt, stamp)
        (``meshd.balance.ewma.EwmaState``'s fields), and their in-flight requests summed:
        what a cost needs, in one pass. Store order suffices: see the module docstring."""
        q, d, per_slot = self._q, self._d, self._per_slot
        base = self._ep + row * EP_FIELDS
        states = []
        inflight = 0
        for slot in slots:
            i = base + slot * per_slot
            inflight += q[i + EP_INFLIGHT]
            states.append((d[i + EP_RTT], d[i + EP_STAMP]))
        return states, inflight

    def state(self, row: int) -> float:
        """The health row's state field alone (one 8-byte load: no lock needed)."""
        d: Any = self._d   # a float64 view: its items are floats already
        return d[self._health + row * HEALTH_FIELDS + H_STATE]

    def state_positions(self, rows: Sequence[int]) -> tuple[int, ...]:
        """Where the state fields of ``rows`` (each >= 0) are, for :meth:`all_healthy`."""
        return tuple(self._health + row * HEALTH_FIELDS + H_STATE for row in rows)

    def all_healthy(self, positions: tuple[int, ...]) -> bool:
        """Every state at ``positions`` (:meth:`state_positions`) is HEALTHY (0.0): one
        8-byte load each, in C (``map``), as :meth:`state` reads them one by one. The
        balancer's common case, checked on every pick before anything is built."""
        return not any(map(self._d.__getitem__, positions))

    def health_values(self, row: int) -> tuple[float, ...] | None:
        """The six values of a health row, a consistent copy: read between two equal,
        even sequence numbers. None after SEQLOCK_TRIES torn reads (a row rewritten
        without pause, or a writer that died mid-row): the caller treats the endpoint
        as ejected for this decision rather than act on a mixed copy."""
        i = self._health + row * HEALTH_FIELDS
        q, d = self._q, self._d
        for _ in range(SEQLOCK_TRIES):
            seq = q[i + H_SEQ]
            if seq & 1:
                continue
            values = tuple(d[i:i + H_VALUES])
            if q[i + H_SEQ] == seq:
                return values
        return None

    def health(self, row: int) -> EndpointHealth | None:
        values = self.health_values(row)
        return None if values is None else EndpointHealth.from_row(values)


class EndpointStripe:
    """One process's endpoint fields: in-flight gauge, its peak-EWMA, outcomes."""

    __slots__ = ("_q", "_d", "_base", "tau", "default_rtt")

    def __init__(self, q: memoryview, d: Any, base: int) -> None:
        self._q: memoryview = q
        self._d: Any = d  # a float64 memoryview (typeshed types memoryview items as int)
        self._base = base
        self.tau = DECAY
        self.default_rtt = DEFAULT_RTT

    def started(self, row: int) -> None:
        self._q[self._base + row * EP_FIELDS + EP_INFLIGHT] += 1

    def finished(self, row: int, rtt: float | None, now: float, failure: bool) -> None:
        """A request ended: in-flight down, the latency observed (peak EWMA), the outcome."""
        i = self._base + row * EP_FIELDS
        q, d = self._q, self._d
        q[i + EP_INFLIGHT] -= 1
        if rtt is not None:
            d[i + EP_RTT], d[i + EP_STAMP] = ewma_observed(d[i + EP_RTT], d[i + EP_STAMP],
                                                           rtt, now, self.tau)
        q[i + (EP_FAILURES if failure else EP_SUCCESSES)] += 1
        if failure:
            q[i + EP_RUN] += 1
        elif q[i + EP_RUN]:
            q[i + EP_RUN] = 0

    def reset_run(self, row: int) -> None:
        i = self._base + row * EP_FIELDS + EP_RUN
        if self._q[i]:
            self._q[i] = 0

    def connections(self, row: int, delta: int) -> None:
        """This process opened (+1) or closed (-1) an upstream connection to the endpoint."""
        self._q[self._base + row * EP_FIELDS + EP_CONNS] += delta

    def seed(self, row: int, now: float) -> None:
        """A new endpoint starts at the default RTT, decaying from now (tower's seeding)."""
        i = self._base + row * EP_FIELDS
        if self._d[i + EP_RTT] == 0.0:
            state = seed(self.default_rtt, now)
            self._d[i + EP_STAMP] = state.stamp
            self._d[i + EP_RTT] = state.rtt


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

    def record_response(self, row: int, status: int, latency_s: float, failure: bool,
                        grpc: int = -1) -> None:
        """Count one response: status (a gRPC answer's grpc-status instead of its 200:
        ``grpc`` >= 0), latency histogram and sum, classification."""
        q = self._q
        base = self._base + row * FIELDS
        # status_field and latency_field inline for the usual case: every response
        if grpc >= 0 and status == 200:
            q[base + grpc_field(grpc)] += 1
        else:
            q[base + (_STATUS_FIELD[status] if status in _STATUS_FIELD
                      else status_field(status))] += 1
        q[base + F_LATENCY + _bisect_left(LATENCY_BUCKETS_MS, latency_s * 1000.0)] += 1
        q[base + F_LATENCY_SUM_US] += int(latency_s * 1_000_000)
        if failure:
            q[base + F_FAILURES] += 1


def region_path(shm_dir: str, instance: str) -> str:
    return os.path.join(shm_dir, f"meshd-{instance}.shm")


# -- growth (see "Growth" in the module docstring) ------------------------------------------

MAX_ROWS = 1_000_000     # the config's ceiling for metric_rows and endpoint_rows

# Header fields a grown region inherits: counters and who-is-who, not the sizes.
_INHERITED_HEADER = (
    (OFF_GENERATION, 8), (OFF_DESIRED, 4), (OFF_MASTER_PID, 4), (OFF_STARTED_AT, 8),
    (OFF_RELOADS, 8),
    (OFF_RELOAD_FAILURES, 8), (OFF_RESTARTS, 8), (OFF_ROWS_EXHAUSTED, 8),
    (OFF_SLOTS_USED, 4), (OFF_ROWS_USED, 4), (OFF_ENDPOINT_ROWS_USED, 4),
)


def usage_high(used: int, capacity: int) -> bool:
    """More than 3/4 of the rows are in use: the next reload grows the region."""
    return used * 4 > capacity * 3


def grown_rows(capacity: int, configured: int, used: int) -> int:
    """Rows for the next generation's region. Never fewer than now (a region never
    shrinks: rows are never reused, and a copy must hold every row) nor than the config
    asks for; when usage passes 3/4 of the capacity or the config asks for more, doubled
    until usage is under half, so that a growing mesh reloads into room to spare rather
    than into the next warning."""
    size = max(capacity, configured)
    if usage_high(used, capacity) or size > capacity:
        while used * 2 >= size and size < MAX_ROWS:
            size = min(size * 2, MAX_ROWS)
    return size


def copy_region(src: Region, dst: Region) -> None:
    """Fill a fresh, at least as large ``dst`` with everything ``src`` holds: header
    counters, the worker table, every used slot's stripes (row r stays row r: the
    snapshots' row assignments keep their meaning) and the health rows. The pages to be
    written are allocated first, so a full tmpfs is an error here, not a SIGBUS."""
    _check_fits(src, dst)
    used = src.get_u32(OFF_SLOTS_USED)
    dst.reserve([
        (0, HEADER_SIZE + src.slots * SLOT_SIZE),
        (dst.stripes_offset, used * dst.rows * FIELDS * 8),
        (dst.ep_offset, used * dst.endpoint_rows * EP_FIELDS * 8),
        (dst.health_offset, src.endpoint_rows * HEALTH_FIELDS * 8),
        (dst.ctl_offset, used * CTL_ENTRIES * 16),
    ])
    for offset, size in _INHERITED_HEADER:
        dst._mm[offset:offset + size] = src._mm[offset:offset + size]
    table = src.slots * SLOT_SIZE
    dst._mm[HEADER_SIZE:HEADER_SIZE + table] = src._mm[HEADER_SIZE:HEADER_SIZE + table]
    for slot in range(used):
        _copy_stripes(src, dst, slot)
    health = src.endpoint_rows * HEALTH_FIELDS * 8
    dst._mm[dst.health_offset:dst.health_offset + health] = \
        src._mm[src.health_offset:src.health_offset + health]


def copy_slot(src: Region, dst: Region, slot: int) -> None:
    """Make ``dst``'s slot what the slot's writer, mapped to ``src``, has written: its
    worker-table record and its stripes. Only rows both regions have are copied (a
    smaller ``dst`` is a reload that failed to boot: counts in rows it lacks stay behind).
    Called by the master for a live process of another region, and once more after its
    reap (gauges already zeroed by ``src.free_slot``)."""
    if not (0 <= slot < src.slots and slot < dst.slots):
        raise IndexError(slot)
    if not dst.writable:
        raise ShmError(f"{dst.path}: attached read-only")
    off = HEADER_SIZE + slot * SLOT_SIZE
    dst._mm[off:off + SLOT_SIZE] = src._mm[off:off + SLOT_SIZE]
    _copy_stripes(src, dst, slot)
    dst._mark_used(slot)


def _copy_stripes(src: Region, dst: Region, slot: int) -> None:
    # A slot's first min(rows) rows are contiguous in both layouts: one copy per section.
    n = min(src.rows, dst.rows) * FIELDS * 8
    a = src.stripes_offset + slot * src.rows * FIELDS * 8
    b = dst.stripes_offset + slot * dst.rows * FIELDS * 8
    dst._mm[b:b + n] = src._mm[a:a + n]
    n = min(src.endpoint_rows, dst.endpoint_rows) * EP_FIELDS * 8
    a = src.ep_offset + slot * src.endpoint_rows * EP_FIELDS * 8
    b = dst.ep_offset + slot * dst.endpoint_rows * EP_FIELDS * 8
    dst._mm[b:b + n] = src._mm[a:a + n]
    n = CTL_ENTRIES * 16
    a = src.ctl_offset + slot * n
    b = dst.ctl_offset + slot * n
    dst._mm[b:b + n] = src._mm[a:a + n]


def _check_fits(src: Region, dst: Region) -> None:
    if not dst.writable:
        raise ShmError(f"{dst.path}: attached read-only")
    if dst.slots < src.slots or dst.rows < src.rows or dst.endpoint_rows < src.endpoint_rows:
        raise ShmError(f"{dst.path} ({dst.slots} slots, {dst.rows} rows, {dst.endpoint_rows} "
                       f"endpoint rows) cannot hold a copy of {src.path} ({src.slots} slots, "
                       f"{src.rows} rows, {src.endpoint_rows} endpoint rows)")


# -- binary upgrade (see "Binary upgrade" in the module docstring) ---------------------------

# Header counters a binary upgrade's new region starts from (the old master's).
_UPGRADE_HEADER = ((OFF_RELOADS, 8), (OFF_RELOAD_FAILURES, 8), (OFF_RESTARTS, 8),
                   (OFF_ROWS_EXHAUSTED, 8))


def inherit(src: Region, dst: Region) -> None:
    """A fresh ``dst`` of a binary upgrade's new master starts from the old master's
    ``src``: its header counters and its health rows (ejections; the endpoint rows keep
    their meaning because the new control process is seeded with the old snapshot)."""
    _check_fits(src, dst)
    for offset, size in _UPGRADE_HEADER:
        dst._mm[offset:offset + size] = src._mm[offset:offset + size]
    health = src.endpoint_rows * HEALTH_FIELDS * 8
    dst._mm[dst.health_offset:dst.health_offset + health] = \
        src._mm[src.health_offset:src.health_offset + health]


def carry_slots(src: Region, dst: Region, n: int) -> None:
    """Copy the stripes and control tables of ``src``'s first ``n`` slots into ``dst``'s
    same slots, gauges zeroed, worker records not copied (no process of ``dst`` is there):
    the old master's counts, refreshed by the new master while the old one lives. Called
    again and again: each copy overwrites the last with the old processes' newer values.
    Only the rows ``src``'s control process has used are copied (the rest are zeros)."""
    _check_fits(src, dst)
    rows = min(max(src.rows_used, FIRST_ROW), src.rows)
    eps = min(src.endpoint_rows_used, src.endpoint_rows)
    q = dst._qr
    for slot in range(min(n, src.slots, dst.slots)):
        size = rows * FIELDS * 8
        a = src.stripes_offset + slot * src.rows * FIELDS * 8
        b = dst.stripes_offset + slot * dst.rows * FIELDS * 8
        dst._mm[b:b + size] = src._mm[a:a + size]
        for row in range(rows):
            for field in GAUGE_FIELDS:
                q[b // 8 + row * FIELDS + field] = 0
        size = eps * EP_FIELDS * 8
        a = src.ep_offset + slot * src.endpoint_rows * EP_FIELDS * 8
        b = dst.ep_offset + slot * dst.endpoint_rows * EP_FIELDS * 8
        dst._mm[b:b + size] = src._mm[a:a + size]
        for row in range(eps):
            for field in (EP_INFLIGHT, EP_CONNS, EP_RUN):
                q[b // 8 + row * EP_FIELDS + field] = 0
        size = CTL_ENTRIES * 16
        a = src.ctl_offset + slot * size
        b = dst.ctl_offset + slot * size
        dst._mm[b:b + size] = src._mm[a:a + size]
        dst._mark_used(slot)
