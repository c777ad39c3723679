"""Trace context in request headers: W3C Trace Context (``traceparent``, ``tracestate``)
and B3 (the single ``b3`` header and the multi ``X-B3-*`` ones). Sans-IO: fields in,
a context and fields out.

``extract`` reads the formats it is given, in their order; the first one that holds a
valid context wins. Every field is client-controlled: a format whose fields are
malformed, oversized or repeated holds no context (the request starts a new trace,
nothing is raised). ``inject`` removes every field of the given formats and writes the
context anew: the formats it came in, or all of them for a trace meshd started, each
with meshd's span id as the parent. ``tracestate`` is passed on as it came when it is
short (``MAX_TRACESTATE``) and printable, else dropped; it goes only with the
``traceparent`` it came with. Field names go out lower-case (valid in HTTP/2 too),
values are hex and dashes only (and tracestate's printable ASCII), so what meshd writes
never makes a head invalid.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import NamedTuple

Fields = list[tuple[bytes, bytes]]

TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
B3 = b"b3"
B3_TRACE_ID = b"x-b3-traceid"
B3_SPAN_ID = b"x-b3-spanid"
B3_PARENT = b"x-b3-parentspanid"
B3_SAMPLED = b"x-b3-sampled"
B3_FLAGS = b"x-b3-flags"
B3_MULTI = frozenset([B3_TRACE_ID, B3_SPAN_ID, B3_PARENT, B3_SAMPLED, B3_FLAGS])
NAMES = {"w3c": frozenset([TRACEPARENT, TRACESTATE]), "b3": B3_MULTI | {B3}}
ALL_NAMES = NAMES["w3c"] | NAMES["b3"]
# The lengths of the names above: a field of another length is skipped without lower().
_LENGTHS = frozenset(len(n) for n in ALL_NAMES)

MAX_TRACESTATE = 512   # W3C: a vendor must pass at least 512 characters on
MAX_TRACESTATE_MEMBERS = 32
MAX_TRACEPARENT = 256  # a future version may append fields; no version needs this many
_HEX = frozenset(b"0123456789abcdef")
_ZERO_TRACE = "0" * 32
_ZERO_TRACE_B = b"0" * 32
_ZERO_SPAN_B = b"0" * 16

# how the context came: "w3c", "b3" (single header), "b3multi"; "" when meshd started it
W3C, B3_SINGLE, B3_MULTI_FORMAT = "w3c", "b3", "b3multi"


class TraceContext(NamedTuple):
    """A trace context read from a request. ``sampled`` None: the sender left the
    decision to us (B3 without a sampling state). (A named tuple: made per request,
    it costs a fifth of a frozen dataclass.)"""
    trace_id: str                   # 32 lower-case hex digits
    span_id: str                    # 16 lower-case hex digits, "" for a B3 decision alone
    sampled: bool | None
    came_as: tuple[str, ...]        # the formats it was read from (W3C, B3_SINGLE, ...)
    tracestate: bytes | None = None


def _hex(value: bytes, length: int) -> str | None:
    """``value`` when it is ``length`` lower-case hex digits, not all zero; else None."""
    if len(value) != length or not _HEX.issuperset(value):
        return None
    text = value.decode("ascii")
    return None if text.count("0") == length else text


_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?",
                         re.DOTALL)


def traceparent(value: bytes) -> tuple[str, str, bool] | None:
    """(trace id, parent id, sampled) of a W3C ``traceparent``, None when invalid
    (version ff, wrong lengths, upper-case or zero ids, version 00 with extra fields)."""
    if len(value) > MAX_TRACEPARENT:
        return None
    m = _TRACEPARENT.fullmatch(value)
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if version == b"ff" or (rest is not None and version == b"00"):
        return None
    if trace_id == _ZERO_TRACE_B or span_id == _ZERO_SPAN_B:
        return None
    return trace_id.decode("ascii"), span_id.decode("ascii"), bool(int(flags, 16) & 1)


def _tracestate(values: list[bytes]) -> bytes | None:
    """Several ``tracestate`` fields are one list (RFC 9110 §5.3): joined, kept when
    short and printable, else None (dropped)."""
    joined = b",".join(v.strip() for v in values)
    if len(joined) > MAX_TRACESTATE or joined.count(b",") >= MAX_TRACESTATE_MEMBERS:
        return None
    if not joined or any(c < 0x20 or c > 0x7e for c in joined):
        return None
    return joined


def _b3_trace_id(value: bytes) -> str | None:
    """A B3 trace id: 32 or 16 hex digits (a 64-bit one is padded to 128 bits)."""
    if len(value) == 16:
        tid = _hex(value, 16)
        return None if tid is None else "0" * 16 + tid
    return _hex(value, 32)


def b3_single(value: bytes) -> TraceContext | None:
    """``b3: traceid-spanid[-sampling[-parentspanid]]``, or a decision alone
    (``0``, ``1``, ``d``)."""
    if len(value) > 128:
        return None
    if value in (b"0", b"1", b"d"):
        return TraceContext(_ZERO_TRACE, "", value != b"0", (B3_SINGLE,))
    parts = value.split(b"-")
    if not 2 <= len(parts) <= 4:
        return None
    trace_id = _b3_trace_id(parts[0])
    span_id = _hex(parts[1], 16)
    if trace_id is None or span_id is None:
        return None
    sampled: bool | None = None
    if len(parts) >= 3:
        if parts[2] not in (b"0", b"1", b"d"):
            return None
        sampled = parts[2] != b"0"
    if len(parts) == 4 and _hex(parts[3], 16) is None:
        return None
    return TraceContext(trace_id, span_id, sampled, (B3_SINGLE,))


def b3_multi(found: dict[bytes, bytes]) -> TraceContext | None:
    """``X-B3-TraceId``, ``X-B3-SpanId``, ``X-B3-Sampled``, ``X-B3-Flags`` (1: debug,
    which samples); only a sampling state, without ids, is a decision alone."""
    sampled: bool | None = None
    flags = found.get(B3_FLAGS)
    state = found.get(B3_SAMPLED)
    if flags is not None and flags != b"0":
        if flags != b"1":
            return None
        sampled = True
    elif state is not None:
        if state in (b"1", b"true"):
            sampled = True
        elif state in (b"0", b"false"):
            sampled = False
        else:
            return None
    tid, sid = found.get(B3_TRACE_ID), found.get(B3_SPAN_ID)
    if tid is None and sid is None:
        if sampled is None:
            return None
        return TraceContext(_ZERO_TRACE, "", sampled, (B3_MULTI_FORMAT,))
    trace_id = _b3_trace_id(tid or b"")
    span_id = _hex(sid or b"", 16)
    if trace_id is None or span_id is None:
        return None
    parent = found.get(B3_PARENT)
    if parent is not None and _hex(parent, 16) is None:
        return None
    return TraceContext(trace_id, span_id, sampled, (B3_MULTI_FORMAT,))


def extract(headers: Sequence[tuple[bytes, bytes]], formats: Sequence[str]
            ) -> tuple[TraceContext | None, bool]:
    """(the request's trace context or None, whether it carries any field of
    ``formats`` at all). A field named twice (tracestate excepted) makes its format
    invalid. A context with a span id but without a trace id is none."""
    seen: dict[bytes, list[bytes]] | None = None
    for k, v in headers:
        if len(k) not in _LENGTHS:
            continue
        name = k.lower()
        if name in ALL_NAMES:
            if seen is None:
                seen = {}
            seen.setdefault(name, []).append(v)
    if seen is None:
        return None, False
    found: list[TraceContext] = []
    for fmt in formats:
        if fmt == "w3c":
            parents = seen.get(TRACEPARENT)
            if parents is not None and len(parents) == 1:
                parsed = traceparent(parents[0].strip())
                if parsed is not None:
                    states = seen.get(TRACESTATE)
                    state = _tracestate(states) if states else None
                    found.append(TraceContext(parsed[0], parsed[1], parsed[2], (W3C,), state))
        elif fmt == "b3":
            singles = seen.get(B3)
            if singles is not None:
                ctx = b3_single(singles[0].strip()) if len(singles) == 1 else None
                if ctx is not None:
                    found.append(ctx)
            elif not seen.keys().isdisjoint(B3_MULTI):
                multi = {n: seen[n] for n in B3_MULTI if n in seen}
                if all(len(v) == 1 for v in multi.values()):
                    ctx = b3_multi({n: v[0].strip() for n, v in multi.items()})
                    if ctx is not None:
                        found.append(ctx)
    relevant = not seen.keys().isdisjoint(_plan(tuple(formats))[0])
    if not found:
        return None, relevant
    best = found[0]
    if len(found) > 1:  # the same trace in several formats: each is written back
        came = tuple(f for c in found if c.trace_id == best.trace_id
                     and c.span_id == best.span_id for f in c.came_as)
        best = TraceContext(best.trace_id, best.span_id, best.sampled, came, best.tracestate)
    return best, relevant


@functools.cache
def _plan(formats: tuple[str, ...]) -> tuple[frozenset[bytes], tuple[str, ...]]:
    """(the field names of ``formats``, what a trace meshd started is written as)."""
    return (frozenset().union(*(NAMES[f] for f in formats)),
            tuple(W3C if f == "w3c" else B3_SINGLE for f in formats))


def inject(headers: Sequence[tuple[bytes, bytes]], formats: Sequence[str], trace_id: str,
           span_id: str, parent_id: str, sampled: bool, came_as: Sequence[str],
           tracestate: bytes | None, strip: bool = True) -> Fields:
    """``headers`` without the fields of ``formats`` (``strip``: when any was there),
    and with the context ``trace_id`` / ``span_id`` (meshd's span, the upstream's
    parent) written in the formats it came as, or in every format of ``formats`` when
    meshd started it (``came_as`` empty; B3 as the single header)."""
    drop, kinds = _plan(tuple(formats))
    out = [(k, v) for k, v in headers if len(k) not in _LENGTHS or k.lower() not in drop] \
        if strip else list(headers)
    flag = b"1" if sampled else b"0"
    ids = (trace_id + "-" + span_id).encode("ascii")
    for kind in came_as or kinds:
        if kind == W3C:
            out.append((TRACEPARENT, b"00-" + ids + (b"-01" if sampled else b"-00")))
            if tracestate:
                out.append((TRACESTATE, tracestate))
        elif kind == B3_SINGLE:
            out.append((B3, ids + b"-" + flag + (b"-" + parent_id.encode("ascii")
                                                 if parent_id else b"")))
        else:
            out.append((B3_TRACE_ID, trace_id.encode("ascii")))
            out.append((B3_SPAN_ID, span_id.encode("ascii")))
            if parent_id:
                out.append((B3_PARENT, parent_id.encode("ascii")))
            out.append((B3_SAMPLED, flag))
    return out
