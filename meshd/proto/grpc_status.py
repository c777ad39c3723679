"""gRPC status codes as meshd reads them off a response: the ``grpc-status`` of its
trailers, or of its head when the answer is trailers-only (one HEADERS frame, no body).

Shared by the metrics (``response_total``'s ``grpc_status`` and ``classification``
labels), failure accrual and retries (``meshd.worker.call``) and the access log. gRPC's
own classification: status 0 (OK) is a success, every other code a failure (Linkerd's
rule too). Of the failures, only a trailers-only UNAVAILABLE may be retried: the server
says it did not take the call, and nothing of the answer reached the client yet
(Envoy's ``retry-on: unavailable``; Linkerd retries a gRPC route marked retryable).

Sans-IO: functions of header fields.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

OK = 0
UNAVAILABLE = 14
# Codes a trailers-only answer may be retried on (when the route allows retries).
RETRYABLE = frozenset({UNAVAILABLE})
NAMES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
         "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
         "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
         "UNAUTHENTICATED")
MAX_CODE = 0xFFFF   # a larger grpc-status is read as UNKNOWN (not a number a client set)


def code(fields: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The ``grpc-status`` of these fields (None: there is none). A malformed value is
    UNKNOWN (2), as gRPC clients read it."""
    for k, v in fields:
        if len(k) == 11 and k.lower() == b"grpc-status":
            v = v.strip()
            if not v.isdigit() or len(v) > 5 or int(v) > MAX_CODE:
                return 2
            return int(v)
    return None


class _Answer(Protocol):
    @property
    def trailers(self) -> Sequence[tuple[bytes, bytes]]: ...
    def h2_head(self) -> Sequence[tuple[bytes, bytes]]: ...


def of_answer(ex: _Answer | None) -> int | None:
    """A response's gRPC status: from its trailers, else from its head (trailers-only);
    None when there is none, or no head to read (an answer cut short)."""
    if ex is None:
        return None
    try:
        found = code(ex.trailers)
        return found if found is not None else code(ex.h2_head())
    except Exception:
        return None


def text_of_answer(ex: _Answer | None) -> str:
    """``of_answer`` as a field of a log line, tap record or span: "" when there is none."""
    found = of_answer(ex)
    return "" if found is None else str(found)
