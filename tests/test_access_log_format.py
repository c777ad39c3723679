"""The access log's formatters and its request-path record, in-process (no meshd).

``fields`` defines a line; the batch formatter (``access_log.lines``) must give exactly
``json.dumps(fields(rec))`` (compact, ASCII) and the text columns ``reference_text``
builds from the same fields (both are the formatter of before its fast path, kept here
as the oracle), for any record: client bytes with control characters, quotes, backslashes,
bytes >= 0x80, cut fields, client ids beyond latin-1 (U+2028, astral), in batches whose
repeated fields the formatter escapes once. And a queued record holds no request
objects: scalars, bytes and long-lived config objects only."""

from __future__ import annotations

import collections
import json
import re
import time
import types
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd.config import Address, ListenerConfig
from meshd.config_access_log import AccessLogConfig
from meshd.discovery.api import Endpoint
from meshd.worker import access_log
from meshd.worker.access_log import (
    BATCH_BYTES,
    FIELDS,
    MAX_AUTHORITY,
    MAX_METHOD,
    MAX_PATH,
    AccessLog,
    _cut,
    endpoint_name,
    lines,
    trace_id,
)

LISTENERS = [ListenerConfig(name="outbound", listen=Address("127.0.0.1", 1), direction="outbound"),
             ListenerConfig(name='in "odd"\\ name\u2028', listen=Address("127.0.0.1", 2),
                            direction="inbound")]
ENDPOINTS = [None, Endpoint("127.0.0.1", 8080), Endpoint("::1", 443),
             Endpoint('h"o\\st\x01', 1)]

# What a client controls, biased to what breaks lines: the JSON and text specials,
# control characters, DEL, high bytes, and lengths around the cut.
SPECIAL = b'"\\\n\r\t\x00\x01\x1f\x7f\x80\xe2\x80\xa8\xff {}:, '
client_bytes = st.one_of(
    st.binary(max_size=40),
    st.lists(st.sampled_from([bytes([c]) for c in SPECIAL] + [b"a", b"GET", b"/x"]),
             max_size=30).map(b"".join),
    st.integers(0, 3).flatmap(lambda extra: st.sampled_from(
        [b"a" * (limit + extra - 1) for limit in (MAX_METHOD, MAX_AUTHORITY, MAX_PATH)])))
client_text = st.text(alphabet=st.sampled_from(
    ['"', "\\", "\n", "\x00", "\x7f", "\xe9", "\u2028", "\U0001f600", " ", "a", "/"]),
    max_size=12)
records = st.tuples(
    st.floats(1e9, 2e9), st.sampled_from(LISTENERS),
    st.sampled_from([b"127.0.0.1", b"::1", b"", b'1"\\ \x01']), client_text,
    client_bytes, st.one_of(st.none(), client_bytes), client_bytes,
    st.integers(100, 599), st.one_of(st.none(), st.integers(0, 65535)),
    st.sampled_from(ENDPOINTS), st.floats(0, 1e5), st.integers(0, 5),
    st.sampled_from(["", "4bf92f3577b34da6a3ce929d0e0e4736"]),
    st.integers(0, 2 ** 40), st.integers(0, 2 ** 40))

def fields(rec: access_log.Record) -> dict[str, Any]:
    """The line's fields, client-controlled ones bounded (not yet escaped), as the
    formatter of before built them: a JSON line is ``json.dumps`` of this."""
    (wall, listener, client, client_id, method, authority, path, status, grpc, ep,
     duration, attempts, trace, received, sent) = rec
    ms = int(wall * 1000 + 0.5)  # rounded to the millisecond, not cut
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000))
                + f".{ms % 1000:03d}Z",
        "direction": listener.direction,
        "listener": listener.name,
        "client": client.decode("latin-1"),
        "client_id": client_id,
        "method": _cut(method, MAX_METHOD),
        "authority": _cut(authority, MAX_AUTHORITY),
        "path": _cut(path, MAX_PATH),
        "status": status,
        "grpc_status": "" if grpc is None else str(grpc),
        "endpoint": endpoint_name(ep),
        "duration_ms": round(duration * 1000, 3),
        "attempts": attempts,
        "trace_id": trace,
        "bytes_received": received,
        "bytes_sent": sent,
    }


def format_json(rec: access_log.Record) -> str:
    """One record's JSON line, from the batch formatter."""
    return lines(collections.deque((rec,)), 1, True)[0]


def format_text(rec: access_log.Record) -> str:
    """One record's text line, from the batch formatter."""
    return lines(collections.deque((rec,)), 1, False)[0]


_ESCAPES = {i: f"\\x{i:02x}" for i in list(range(0x20)) + list(range(0x7f, 0x100))}
_ESCAPES.update({ord("\\"): "\\\\", ord('"'): '\\"', ord("\n"): "\\n", ord("\r"): "\\r",
                 ord("\t"): "\\t"})


def reference_text(rec: access_log.Record) -> bytes:
    """The text line as the formatter of before built it from ``fields``."""
    f = fields(rec)
    out = []
    for name in FIELDS:
        value = f[name]
        if name in ("method", "authority", "path", "client_id"):
            out.append('"' + value.translate(_ESCAPES) + '"')
        elif value == "" or value is None:
            out.append("-")
        elif isinstance(value, str):
            out.append(value.translate(_ESCAPES).replace(" ", "\\x20"))
        else:
            out.append(str(value))
    return (" ".join(out) + "\n").encode("ascii", "backslashreplace")


def _encoded(text: str) -> bytes:
    return text.encode("ascii", "backslashreplace")  # what AccessLog.flush writes


def _one_line(data: bytes) -> None:
    assert data.endswith(b"\n") and data.count(b"\n") == 1, data
    assert all(0x20 <= c < 0x7f for c in data[:-1]), data


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records)
def test_json_line_is_json_dumps_of_the_fields(rec):
    line = _encoded(format_json(rec))
    _one_line(line)
    assert line == (json.dumps(fields(rec), separators=(",", ":")) + "\n").encode()
    assert json.loads(line) == fields(rec)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records)
def test_text_line_is_the_reference_columns(rec):
    line = _encoded(format_text(rec))
    _one_line(line)
    assert line == reference_text(rec)
    # quoted fields may hold spaces; quotes and backslashes in them are escaped
    assert len(re.findall(rb'"(?:[^"\\]|\\.)*"|(?:[^ "\\\n]|\\.)+', line)) == len(FIELDS), line


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records, min_size=1, max_size=12), st.booleans())
def test_a_batch_is_its_lines_one_by_one(recs, as_json):
    """What the formatter escapes once per change (client, method, authority, time
    stamp, listener and endpoint texts) never leaks into the next line."""
    # neighbours that share some fields and not others
    recs = recs + [r[:4] + (recs[0][4],) + r[5:] for r in recs]
    queue = collections.deque(recs)
    got = lines(queue, 10 ** 9, as_json)
    assert not queue
    one = format_json if as_json else format_text
    assert got == [one(r) for r in recs]


def test_a_batch_stops_at_its_budget():
    rec = (1.7e9, LISTENERS[0], b"127.0.0.1", "", b"GET", b"web", b"/" + b"a" * 1000, 200,
           None, None, 0.001, 1, "", 0, 0)
    queue = collections.deque([rec] * 200)
    first = lines(queue, BATCH_BYTES, True)
    assert sum(map(len, first)) >= BATCH_BYTES and len(first) < 200 and queue
    assert len(first) + len(lines(queue, 10 ** 9, True)) == 200


def test_forged_lines_stay_one_field():
    """A path that carries a whole line of its own (JSON and text) stays inside its field."""
    evil = b'/x"\\%0d%0a{"status":200}"\n{"status":204}\r\n\x00' + "\u2028".encode()
    rec = (1.7e9, LISTENERS[1], b"127.0.0.1", 'spiffe://x/"\n', b'GET"\n', b'h"\n', evil,
           400, 14, ENDPOINTS[3], 0.0015, 2, "", 1, 2)
    entry = json.loads(_encoded(format_json(rec)))
    assert entry["path"] == evil.decode("latin-1") and entry["status"] == 400
    assert entry["grpc_status"] == "14" and entry["duration_ms"] == 1.5
    text = _encoded(format_text(rec))
    _one_line(text)
    assert text == reference_text(rec)


def test_duration_is_repr_of_round():
    for d in (0.0, 1e-7, 5e-7, 0.0005, 0.0015, 0.001, 2.0, 0.1234565, 86400.0 * 365):
        rec = (1.7e9, LISTENERS[0], b"", "", b"", None, b"", 200, None, None, d, 0, "", 0, 0)
        assert json.loads(format_json(rec))["duration_ms"] == round(d * 1000, 3)
        assert f'"duration_ms":{round(d * 1000, 3)!r},' in format_json(rec)


def test_the_queued_record_holds_no_request_objects():
    """The request's headers, call and exchange are read at once, not queued."""
    alog = AccessLog(AccessLogConfig(path="-", format="json"))
    alog.fd = 1  # not opened: nothing is written, the queue is read here
    ep = ENDPOINTS[1]
    call = types.SimpleNamespace(tried=[1, 0], endpoints=(ENDPOINTS[2], ep))
    headers = [(b"Host", b"web"), (b"TraceParent",
                                   b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01")]

    class Answered:  # a gRPC exchange's answer: trailers, else the head
        trailers = [(b"grpc-status", b"5")]

        def h2_head(self):
            return []
    answered = Answered()
    alog.request(LISTENERS[0], b"10.0.0.1", "", b"POST", b"web", b"/p", 200, call, 0.0,
                 headers, answered, 3, 4)
    (rec,) = alog.queue
    assert all(x is not headers and x is not call and x is not answered for x in rec)
    assert all(isinstance(x, (int, float, str, bytes, ListenerConfig, Endpoint))
               or x is None for x in rec), rec
    entry = json.loads(format_json(rec))
    assert entry["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert entry["grpc_status"] == "5" and entry["endpoint"] == "[::1]:443"  # tried last
    assert entry["attempts"] == 2 and entry["method"] == "POST"
    assert (entry["bytes_received"], entry["bytes_sent"]) == (3, 4)


def test_a_full_queue_drops_before_reading_anything():
    alog = AccessLog(AccessLogConfig(path="-", format="json", queue=16))
    alog.fd = 1
    for _ in range(20):
        alog.request(LISTENERS[0], b"", "", b"GET", None, b"/", 200, None, 0.0, [])
    assert len(alog.queue) == 16 and alog.dropped == 4


def test_trace_id_of_the_headers():
    tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert trace_id([(b"traceparent", tp)]) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace_id([(b"x-b3-traceid", b"80F198EE56343BA8"), (b"traceparent", tp)]) \
        == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace_id([(b"b3", b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]) \
        == "80f198ee56343ba864fe8b2a57d3eff7"
    assert trace_id([(b"X-B3-TraceId", b"80f198ee56343ba8")]) == "80f198ee56343ba8"
    for bad in (b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01",      # all zero
                b"00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",  # not hex
                b"00-4bf92f35\"7b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                b"garbage"):
        assert trace_id([(b"traceparent", bad)]) == ""
    assert trace_id([(b"x-b3-traceid", b"80f198ee5634\n3ba8")]) == ""
    assert trace_id([(b"host", b"x"), (b"b3", b"0")]) == ""
