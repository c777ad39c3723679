"""meshd.shm: the region's bytes as its docstring describes them, the worker table, the
counter stripes, and a second process writing its own stripe."""

from __future__ import annotations

import os
import shutil
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshd import shm
from meshd.errors import ShmError
from meshd.shm import (
    F_CLASS,
    F_FAILURES,
    F_LATENCY,
    F_LATENCY_SUM_US,
    F_REQUESTS,
    F_STATUS,
    F_TCP_OPEN,
    F_TCP_OPEN_TOTAL,
    FIELDS,
    HEADER_SIZE,
    KIND_CONTROL,
    KIND_WORKER,
    LATENCY_BUCKETS_MS,
    SLOT_SIZE,
    STATE_BOOTING,
    STATE_DRAINING,
    STATE_SERVING,
    STATUS_CODES,
    Region,
    latency_field,
    region_size,
    status_field,
)

SLOTS, ROWS = 4, 8
INF_FIELD = F_LATENCY + len(LATENCY_BUCKETS_MS)


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "meshd-test.shm")


@pytest.fixture
def region(path: str) -> Iterator[Region]:
    r = Region.create(path, SLOTS, ROWS)
    yield r
    r.close()


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def stripe_field(raw: bytes, slot: int, row: int, field: int) -> int:
    """A counter read straight from the file, by the docstring's formula."""
    stripes = HEADER_SIZE + SLOTS * SLOT_SIZE
    return struct.unpack_from("<Q", raw, stripes + ((slot * ROWS + row) * FIELDS + field) * 8)[0]


def tampered(path: str, tmp_path: Path, offset: int, data: bytes) -> str:
    copy = str(tmp_path / "tampered.shm")
    shutil.copy(path, copy)
    with open(copy, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return copy


# -- header and size -----------------------------------------------------------------------

def test_file_size_is_region_size(region: Region, path: str) -> None:
    assert os.path.getsize(path) == region_size(SLOTS, ROWS)
    eps = shm.DEFAULT_ENDPOINT_ROWS
    assert region_size(SLOTS, ROWS) == (HEADER_SIZE + SLOTS * SLOT_SIZE + SLOTS * ROWS * FIELDS * 8
                                        + SLOTS * eps * shm.EP_FIELDS * 8 + eps * shm.HEALTH_FIELDS * 8
                                        + SLOTS * shm.CTL_ENTRIES * 16)
    assert region.stripes_offset == HEADER_SIZE + SLOTS * SLOT_SIZE


def test_header_bytes(region: Region, path: str) -> None:
    raw = file_bytes(path)
    assert raw[0:8] == b"MESHDSHM"
    version, header_size, total = struct.unpack_from("<IIQ", raw, 8)
    assert (version, header_size, total) == (shm.VERSION, HEADER_SIZE, len(raw))
    slots, rows, desired, master_pid = struct.unpack_from("<IIII", raw, 32)
    assert (slots, rows, desired, master_pid) == (SLOTS, ROWS, 0, os.getpid())
    started = struct.unpack_from("<d", raw, 48)[0]
    assert started == region.started_at
    assert abs(started - time.time()) < 60
    assert struct.unpack_from("<I", raw, 88)[0] == region.endpoint_rows
    assert struct.unpack_from("<I", raw, 92)[0] == 0  # no slot claimed yet
    assert struct.unpack_from("<II", raw, 96) == (0, 0)  # rows in use: none published yet
    assert struct.unpack_from("<Q", raw, 104)[0] == shm.LAYOUT_FINGERPRINT
    assert raw[112:128] == bytes(16)  # reserved
    region.publish_usage(rows=5, endpoint_rows=7)
    assert struct.unpack_from("<II", file_bytes(path), 96) == (5, 7)
    assert (region.rows_used, region.endpoint_rows_used) == (5, 7)


def test_header_counters_are_shared_with_readers(region: Region, path: str) -> None:
    reader = Region.attach(path)
    try:
        assert (reader.slots, reader.rows, reader.writable) == (SLOTS, ROWS, False)
        region.set_u32(shm.OFF_DESIRED, 3)
        region.add_u64(shm.OFF_RELOADS)
        region.add_u64(shm.OFF_RELOADS, 2)
        region.set_u64(shm.OFF_GENERATION, 7)
        assert reader.get_u32(shm.OFF_DESIRED) == 3
        assert reader.get_u64(shm.OFF_RELOADS) == 3
        assert reader.get_u64(shm.OFF_GENERATION) == 7
        assert struct.unpack_from("<Q", file_bytes(path), 56)[0] == 3
    finally:
        reader.close()


def test_create_refuses_too_few_rows(path: str) -> None:
    with pytest.raises(ShmError, match="at least 3"):
        Region.create(path, SLOTS, 2)


def test_bad_magic_is_refused(region: Region, path: str, tmp_path: Path) -> None:
    bad = tampered(path, tmp_path, 0, b"NOTMESHD")
    with pytest.raises(ShmError, match=r"tampered\.shm: not a meshd region \(bad magic\)"):
        Region.attach(bad)


# The layout's identity. Changing any struct format, offset, field index or counter table
# in meshd/shm.py moves the fingerprint: bump shm.VERSION, then update this pair (both).
EXPECTED_LAYOUT = (8, 0xf2c79faf89c841f3)


def test_layout_change_bumps_version() -> None:
    assert (shm.VERSION, shm.LAYOUT_FINGERPRINT) == EXPECTED_LAYOUT, (
        "meshd/shm.py's layout changed: bump VERSION and update EXPECTED_LAYOUT")


def test_layout_fingerprint_covers_formats_and_offsets(monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib
    def fingerprint(layout: tuple[object, ...]) -> int:
        return int.from_bytes(hashlib.sha256(repr(layout).encode()).digest()[:8], "little")
    assert fingerprint(shm.LAYOUT) == shm.LAYOUT_FINGERPRINT
    header, slot, row, endpoint, health, control, sections = shm.LAYOUT
    moved = (header, (slot[0], slot[1], slot[2].replace("Q", "q", 1), slot[3]), row,
             endpoint, health, control, sections)
    assert fingerprint(moved) != shm.LAYOUT_FINGERPRINT
    offsets = dict(header[3])
    assert offsets["OFF_FINGERPRINT"] == 104 and offsets["OFF_SLOTS_USED"] == 92
    assert dict(slot[3])["SLOT_CONNECTIONS"] == 48


def test_other_fingerprint_is_refused(region: Region, path: str, tmp_path: Path) -> None:
    """A region of the same VERSION laid out by other sources (a forgotten bump) is
    refused on attach with both fingerprints named, not read as zeros."""
    bad = tampered(path, tmp_path, shm.OFF_FINGERPRINT, struct.pack("<Q", 0x1234))
    with pytest.raises(ShmError, match=rf"tampered\.shm: layout fingerprint 0000000000001234, "
                                       rf"this meshd reads {shm.LAYOUT_FINGERPRINT:016x}"):
        Region.attach(bad)


def test_a_version_2_region_is_refused_clearly(region: Region, path: str, tmp_path: Path) -> None:
    old = tampered(path, tmp_path, shm.OFF_VERSION, struct.pack("<I", 2))
    with pytest.raises(ShmError, match=rf"layout version 2, this meshd reads {shm.VERSION} "
                                       r"\(a different meshd release wrote it\)"):
        Region.attach(old)


def test_health_row_is_read_under_its_seqlock(region: Region, path: str) -> None:
    """Another process rewrites a health row over and over between two states; every copy
    a reader takes is one of them, never a mix (the probe grant's state, since and
    prober go together)."""
    a = (2.0, 0.0, 1.0, 50.0, 40.0, 4.0)      # PROBING, granted to slot 4 at 40
    b = (1.0, 0.0, 2.0, 90.0, 80.0, -1.0)     # EJECTED again at 80
    region.set_health(3, a)
    assert region._qr[region.health_index(3) + shm.H_SEQ] == 2   # even: bumped twice
    done = region.health_index(4)   # another row's state field: the writer's stop flag
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for n in range(2_000_000):
                if region._dr[done]:
                    break
                region.set_health(3, b if n % 2 else a)
            code = 0
        finally:
            os._exit(code)
    reader = Region.attach(path)
    try:
        view = reader.endpoint_view()
        seen = set()
        deadline = time.monotonic() + 20
        for _ in range(50_000):
            seen.add(view.health_values(3))
            if len(seen) > 2 or time.monotonic() > deadline:
                break
    finally:
        region._dr[done] = 1.0
        _, status = os.waitpid(pid, 0)
        reader.close()
    assert os.waitstatus_to_exitcode(status) == 0
    assert seen - {None} <= {a, b}, seen - {a, b, None}
    assert seen & {a, b}, "no consistent copy in 50,000 reads"


def test_other_version_is_refused(region: Region, path: str, tmp_path: Path) -> None:
    bad = tampered(path, tmp_path, 8, struct.pack("<I", 99))
    with pytest.raises(ShmError, match=rf"layout version 99, this meshd reads {shm.VERSION}"):
        Region.attach(bad)


def test_other_header_size_is_refused(region: Region, path: str, tmp_path: Path) -> None:
    bad = tampered(path, tmp_path, 12, struct.pack("<I", 64))
    with pytest.raises(ShmError, match="64-byte header") as info:
        Region.attach(bad)
    assert f"expected a {HEADER_SIZE}-byte header" in str(info.value)


def test_truncated_file_is_refused(region: Region, path: str, tmp_path: Path) -> None:
    short = tmp_path / "short.shm"
    short.write_bytes(file_bytes(path)[:1000])
    with pytest.raises(ShmError, match=f"{region_size(SLOTS, ROWS)} bytes in all.*has 1000 bytes"):
        Region.attach(str(short))


def test_file_smaller_than_a_header_is_refused(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.shm"
    tiny.write_bytes(b"MESHDSHM")
    with pytest.raises(ShmError, match="too small to be a meshd region"):
        Region.attach(str(tiny))


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ShmError, match="cannot open shared memory: No such file"):
        Region.attach(str(tmp_path / "absent.shm"))


# -- worker table --------------------------------------------------------------------------

def test_slot_life_cycle(region: Region, path: str) -> None:
    reader = Region.attach(path)
    try:
        assert list(reader.slots_in_use()) == []
        before = time.monotonic()
        region.claim_slot(1, generation=5, kind=KIND_WORKER)
        rec = reader.read_slot(1)
        assert (rec.index, rec.pid, rec.generation, rec.state, rec.kind) == (
            1, -1, 5, STATE_BOOTING, KIND_WORKER)
        assert before <= rec.started == rec.heartbeat <= time.monotonic()
        assert [r.index for r in reader.slots_in_use()] == [1]  # reserved counts as in use

        region.set_pid(1, 4242)
        region.claim_slot(3, generation=5, kind=KIND_CONTROL)
        region.set_pid(3, 4243)
        assert [(r.index, r.pid, r.kind) for r in reader.slots_in_use()] == [
            (1, 4242, KIND_WORKER), (3, 4243, KIND_CONTROL)]
        pid = struct.unpack_from("<q", file_bytes(path), HEADER_SIZE + 1 * SLOT_SIZE)[0]
        assert pid == 4242

        region.heartbeat(1, STATE_SERVING)
        served = reader.read_slot(1)
        assert served.state == STATE_SERVING and served.heartbeat >= rec.heartbeat
        region.heartbeat(1)
        assert reader.read_slot(1).state == STATE_SERVING  # no state: kept
        region.heartbeat(1, STATE_DRAINING)
        assert reader.read_slot(1).state == STATE_DRAINING

        region.free_slot(1)
        assert reader.read_slot(1) == shm.SlotRecord(1, 0, 0.0, 0, 0, 0, 0.0)
        assert [r.index for r in reader.slots_in_use()] == [3]
    finally:
        reader.close()


def test_slot_index_out_of_range(region: Region) -> None:
    with pytest.raises(IndexError):
        region.read_slot(SLOTS)
    with pytest.raises(IndexError):
        region.stripe(-1)


def test_free_slot_zeroes_gauges_and_keeps_counters(region: Region) -> None:
    region.claim_slot(0, generation=1, kind=KIND_WORKER)
    stripe = region.stripe(0)
    for row in (2, 5):
        stripe.add(row, F_TCP_OPEN_TOTAL, 3)
        stripe.add(row, F_TCP_OPEN, 2)
        stripe.add(row, F_REQUESTS, 9)
    other = region.stripe(1)
    other.add(2, F_TCP_OPEN, 1)

    region.free_slot(0)

    for row in (2, 5):
        assert region.read_field(0, row, F_TCP_OPEN) == 0
        assert region.read_field(0, row, F_TCP_OPEN_TOTAL) == 3
        assert region.read_field(0, row, F_REQUESTS) == 9
    assert region.read_field(1, 2, F_TCP_OPEN) == 1  # another slot's gauge is untouched


# -- counter stripes -----------------------------------------------------------------------

def test_stripes_are_independent_and_rows_sum_them(region: Region, path: str) -> None:
    region.stripe(0).add(2, F_REQUESTS, 3)
    region.stripe(2).add(2, F_REQUESTS, 4)
    region.stripe(2).add(3, F_REQUESTS)
    region.stripe(2).sub(2, F_REQUESTS)

    raw = file_bytes(path)
    assert stripe_field(raw, 0, 2, F_REQUESTS) == 3
    assert stripe_field(raw, 2, 2, F_REQUESTS) == 3
    assert stripe_field(raw, 1, 2, F_REQUESTS) == 0
    assert stripe_field(raw, 2, 3, F_REQUESTS) == 1
    assert region.read_field(2, 2, F_REQUESTS) == 3

    totals = region.row_totals(2)
    assert len(totals) == FIELDS
    assert totals[F_REQUESTS] == 6
    assert sum(totals) == 6
    assert region.row_totals(3)[F_REQUESTS] == 1
    with pytest.raises(IndexError):
        region.row_totals(ROWS)


def test_read_only_attach_refuses_writes(region: Region, path: str) -> None:
    region.stripe(0).add(2, F_REQUESTS)
    reader = Region.attach(path)
    try:
        with pytest.raises(ShmError, match="attached read-only"):
            reader.stripe(0)
        assert reader.row_totals(2)[F_REQUESTS] == 1
    finally:
        reader.close()


def test_writable_attach_shares_counters(region: Region, path: str) -> None:
    other = Region.attach(path, writable=True)
    try:
        other.stripe(1).add(4, F_REQUESTS, 5)
        assert region.row_totals(4)[F_REQUESTS] == 5
    finally:
        other.close()


@pytest.mark.parametrize(("status", "field"), [
    (200, F_STATUS + STATUS_CODES.index(200)),
    (503, F_STATUS + STATUS_CODES.index(503)),
    (431, F_STATUS + STATUS_CODES.index(431)),
    (101, F_CLASS + 0),
    (299, F_CLASS + 1),
    (303, F_CLASS + 2),
    (418, F_CLASS + 3),
    (599, F_CLASS + 4),
])
def test_status_field(status: int, field: int) -> None:
    assert status_field(status) == field


def test_record_response(region: Region) -> None:
    stripe = region.stripe(0)
    stripe.record_response(2, 200, 0.0015, failure=False)
    stripe.record_response(2, 418, 0.0004, failure=False)
    stripe.record_response(2, 599, 75.0, failure=True)
    t = region.row_totals(2)
    assert t[F_STATUS + STATUS_CODES.index(200)] == 1
    assert t[F_CLASS + 3] == 1  # 418 -> 4xx
    assert t[F_CLASS + 4] == 1  # 599 -> 5xx
    assert t[F_FAILURES] == 1
    assert t[F_LATENCY + 0] == 1  # 0.4 ms <= 1
    assert t[F_LATENCY + 1] == 1  # 1.5 ms <= 2
    assert t[INF_FIELD] == 1  # 75 s
    assert t[F_LATENCY_SUM_US] == 1500 + 400 + 75_000_000
    assert t[F_REQUESTS] == 0  # requests are counted where they arrive, not here


@pytest.mark.parametrize(("ms", "field"), [
    (0.0, F_LATENCY),
    (1.0, F_LATENCY),
    (1.0001, F_LATENCY + 1),
    (2.0, F_LATENCY + 1),
    (10.5, F_LATENCY + LATENCY_BUCKETS_MS.index(20)),
    (50000.0, INF_FIELD - 1),
    (50000.001, INF_FIELD),
    (1e9, INF_FIELD),
])
def test_latency_field(ms: float, field: int) -> None:
    assert latency_field(ms) == field


def test_latency_field_at_every_bound() -> None:
    for i, bound in enumerate(LATENCY_BUCKETS_MS):
        assert latency_field(float(bound)) == F_LATENCY + i
        assert latency_field(bound + 1e-6) == F_LATENCY + i + 1


# -- another process -----------------------------------------------------------------------

def test_child_process_writes_its_own_stripe(region: Region, path: str) -> None:
    region.stripe(0).add(2, F_REQUESTS, 1)
    pid = os.fork()
    if pid == 0:  # the child: attach as a worker would, write, leave without pytest's cleanup
        code = 1
        try:
            child = Region.attach(path, writable=True)
            child.stripe(1).add(2, F_REQUESTS, 10)
            child.stripe(1).record_response(2, 502, 0.003, failure=True)
            child.heartbeat(1, STATE_SERVING)
            child.close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    t = region.row_totals(2)
    assert t[F_REQUESTS] == 11
    assert t[F_STATUS + STATUS_CODES.index(502)] == 1
    assert t[F_FAILURES] == 1
    assert region.read_field(1, 2, F_REQUESTS) == 10
    assert region.read_slot(1).state == STATE_SERVING


def test_endpoint_stripes_and_health_rows(region: Region, path: str) -> None:
    a, b = region.ep_stripe(0), region.ep_stripe(1)
    a.started(5)
    a.started(5)
    b.started(5)
    a.finished(5, 0.050, 100.0, failure=False)
    b.finished(5, None, 100.0, failure=True)
    reader = Region.attach(path)
    try:
        inflight0, rtt0, stamp0, ok0, bad0 = reader.ep_read(0, 5)
        assert (inflight0, ok0, bad0) == (1, 1, 0)
        assert (rtt0, stamp0) == (0.050, 100.0)
        assert reader.ep_read(1, 5)[0] == 0 and reader.ep_read(1, 5)[4] == 1
        region.set_health(5, (1.0, 7.0, 1.0, 123.5, 100.0, -1.0))
        assert reader.health(5) == (1.0, 7.0, 1.0, 123.5, 100.0, -1.0)
        with pytest.raises(ShmError, match="read-only"):
            reader.set_health(5, (0.0,))
    finally:
        reader.close()
    region.claim_slot(0, 1, shm.KIND_WORKER)
    region.free_slot(0)  # the in-flight gauge goes, the outcomes stay
    assert region.ep_read(0, 5)[0] == 0 and region.ep_read(0, 5)[3] == 1
