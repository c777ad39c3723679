"""Tap's shared core (sans-IO): the filter a tap client gives, the record a worker sends,
the NDJSON line a client reads, and the files that connect the two processes.

How a tap works (``meshd.control.tap`` serves it, ``meshd.worker.tap`` feeds it):

- A client opens admin ``/tap?service=S&method=M&path_prefix=P&status=N&direction=D``.
  The control process keeps its ``Filter`` and writes the filters of every open tap to
  the *filter file* (``tap_paths``) with a new version; when the last tap leaves, the
  file holds no filter.
- Each worker stat()s that file in its snapshot poll (every 100 ms, off the request
  path). While it is absent or empty the worker's ``tap`` attribute is None, and the
  request path does one attribute test: no record built, no syscall. While it lists
  filters the worker keeps the requests that match any of them (a coarse pre-filter: a
  tap of one service does not ship the others) as tuples on a bounded queue; a greenlet
  sends them
  in batches as non-blocking datagrams to the control's *tap socket*, dropping (and
  counting) what does not fit.
- The control process applies each client's own filter and queues the line per client,
  bounded: a reader that does not keep up loses lines (``meshd_tap_dropped_total``),
  never traffic.

Everything a client controls is bounded here: the filter's values (``parse_query``) and
the record's method, authority and path (cut like the access log's).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

# The line's fields, in order (CONTRACT, "Observability"); a record is a tuple of them.
FIELDS = ("ts", "direction", "listener", "service", "authority", "method", "path", "status",
          "grpc_status", "latency_ms", "endpoint", "tls", "client_id", "attempts")
Record = tuple[float, str, str, str, str, str, str, int, str, float, str, bool, str, int]

MAX_SERVICE = 253
MAX_PATH = 2048       # the access log's bounds (meshd.worker.access_log), kept here
MAX_AUTHORITY = 256   # so that this module imports no gevent
MAX_METHOD = 32
MAX_QUERY = 4096       # bytes of a /tap query string
DIRECTIONS = ("inbound", "outbound")
MSG_RECORDS = 0        # worker -> control datagrams (msgpack): [0, [record, ...]]
MSG_STATE = 1          # [1, pid, filter version applied, records sent, records dropped]
QUERY_KEYS = ("service", "method", "path_prefix", "status", "direction")


class FilterError(ValueError):
    """A /tap query that does not make a filter (the client gets 400 and this text)."""


@dataclass(frozen=True, slots=True)
class Filter:
    """What one tap client wants; an empty field matches anything. ``status`` is an
    exact code (404) or a class (5 for "5xx"; 0: any)."""

    service: str = ""
    method: str = ""
    path_prefix: str = ""
    status: int = 0
    status_class: bool = False
    direction: str = ""

    def matches(self, service: str, method: bytes | str, path: bytes | str, status: int,
                direction: str) -> bool:
        """Whether a request matches (method and path as bytes in a worker, str in the
        control process: both compare as latin-1)."""
        if self.service and service != self.service:
            return False
        if self.direction and direction != self.direction:
            return False
        if self.status and (status // 100 if self.status_class else status) != self.status:
            return False
        if self.method:
            m = method.decode("latin-1") if isinstance(method, bytes) else method
            if m != self.method:
                return False
        if self.path_prefix:
            p = path.decode("latin-1") if isinstance(path, bytes) else path
            if not p.startswith(self.path_prefix):
                return False
        return True

    @property
    def everything(self) -> bool:
        return not (self.service or self.method or self.path_prefix or self.status
                    or self.direction)

    def as_dict(self) -> dict[str, Any]:
        return {"service": self.service, "method": self.method, "path_prefix": self.path_prefix,
                "status": self.status, "status_class": self.status_class,
                "direction": self.direction}

    @classmethod
    def from_dict(cls, raw: Any) -> Filter:
        """A filter the control process wrote (the filter file); ValueError otherwise."""
        if not isinstance(raw, dict):
            raise ValueError("not a filter")
        f = cls(str(raw.get("service", ""))[:MAX_SERVICE], str(raw.get("method", ""))[:MAX_METHOD],
                str(raw.get("path_prefix", ""))[:MAX_PATH], int(raw.get("status", 0)),
                bool(raw.get("status_class", False)), str(raw.get("direction", "")))
        return f


def parse_query(query: str) -> Filter:
    """The filter of a /tap query string. Raises FilterError naming the bad key."""
    if len(query) > MAX_QUERY:
        raise FilterError(f"query longer than {MAX_QUERY} bytes")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False,
                          max_num_fields=len(QUERY_KEYS) + 1, encoding="latin-1")
    except ValueError:
        raise FilterError("too many query fields") from None
    got: dict[str, str] = {}
    for key, value in pairs:
        if key not in QUERY_KEYS:
            raise FilterError(f"unknown key {key[:32]!r} (known: {', '.join(QUERY_KEYS)})")
        if key in got:
            raise FilterError(f"{key} given twice")
        got[key] = value
    service = got.get("service", "")
    if len(service) > MAX_SERVICE:
        raise FilterError(f"service longer than {MAX_SERVICE} characters")
    method = got.get("method", "")
    if len(method) > MAX_METHOD or not all(33 <= ord(c) < 127 for c in method):
        raise FilterError("method: a token of at most 32 characters")
    prefix = got.get("path_prefix", "")
    if len(prefix) > MAX_PATH:
        raise FilterError(f"path_prefix longer than {MAX_PATH} characters")
    direction = got.get("direction", "")
    if direction and direction not in DIRECTIONS:
        raise FilterError('direction: "inbound" or "outbound"')
    status, status_class = 0, False
    text = got.get("status", "")
    if text:
        if len(text) == 3 and text[0] in "12345" and text[1:].lower() == "xx":
            status, status_class = int(text[0]), True
        elif text.isdigit() and len(text) == 3 and 100 <= int(text) <= 599:
            status = int(text)
        else:
            raise FilterError("status: a code (404) or a class (5xx)")
    return Filter(service, method, prefix, status, status_class, direction)


def any_matches(filters: tuple[Filter, ...], service: str, method: bytes, path: bytes,
                status: int, direction: str) -> bool:
    for f in filters:
        if f.matches(service, method, path, status, direction):
            return True
    return False


def cut(value: bytes | None, limit: int) -> str:
    """A client-controlled field, bounded (the access log's rule: "..." marks a cut)."""
    if not value:
        return ""
    text = value[:limit].decode("latin-1")
    return text + "..." if len(value) > limit else text


def cut_method(value: bytes | None) -> str:
    return cut(value, MAX_METHOD)


def cut_authority(value: bytes | None) -> str:
    return cut(value, MAX_AUTHORITY)


def cut_path(value: bytes | None) -> str:
    return cut(value, MAX_PATH)


_JSON_STR = json.encoder.encode_basestring_ascii  # json.dumps of one str, as a function
_second: list[Any] = [-1, ""]  # the last second formatted, and its text


def timestamp(wall: float) -> str:
    """ISO 8601 UTC to the millisecond, as the access log writes its time."""
    ms = int(wall * 1000 + 0.5)
    sec = ms // 1000
    if _second[0] != sec:  # strftime once a second, not once a line
        _second[:] = [sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))]
    return f"{_second[1]}.{ms % 1000:03d}Z"


def to_line(rec: Any) -> bytes:
    """A record as received (a msgpack list, ``FIELDS`` in order) as one NDJSON line:
    what ``json.dumps`` of its fields gives, compact and ASCII, each string through
    json's own encoder (about twice as fast). Raises TypeError or ValueError on anything
    that is not a record (a datagram that is not a worker's: the socket is 0600, but be
    strict)."""
    (ts, direction, listener, service, authority, method, path, status, grpc, latency,
     endpoint, tls, client_id, attempts) = rec
    s = _JSON_STR
    return (f'{{"ts":"{timestamp(float(ts))}","direction":{s(direction)},"listener":'
            f'{s(listener)},"service":{s(service)},"authority":{s(authority)},"method":'
            f'{s(method)},"path":{s(path)},"status":{int(status)},"grpc_status":{s(grpc)},'
            f'"latency_ms":{round(float(latency), 3)},"endpoint":{s(endpoint)},"tls":'
            f'{"true" if tls is True else "false"},"client_id":{s(client_id)},"attempts":'
            f'{int(attempts)}}}\n').encode()


def tap_paths(shm_dir: str, instance: str, master_pid: int, generation: int) -> tuple[str, str]:
    """(the control process's tap socket, the filter file) of a generation, beside its
    control socket (``meshd.snapshot.control_socket_path``)."""
    stem = os.path.join(shm_dir, f"meshd-{instance}-{master_pid}-g{generation}")
    return stem + ".tap", stem + ".tapf"


def encode_filters(version: int, filters: list[Filter]) -> bytes:
    return json.dumps({"version": version, "filters": [f.as_dict() for f in filters]}).encode()


def decode_filters(raw: bytes) -> tuple[int, tuple[Filter, ...]]:
    """(version, filters) of a filter file. Raises ValueError."""
    data = json.loads(raw)
    if not isinstance(data, dict) or not isinstance(data.get("filters"), list):
        raise ValueError("not a tap filter file")
    return int(data["version"]), tuple(Filter.from_dict(f) for f in data["filters"][:64])
