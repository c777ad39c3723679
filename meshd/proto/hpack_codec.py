"""HPACK (RFC 7541) for meshd's HTTP/2 connections: the encoder and decoder that h2 calls
(``conn.encoder`` / ``conn.decoder``), in place of the hpack package's.

Why: the hpack package spends about a third of h2's time per request (py-spy on the
two-hop bench; ``scripts/h2_micro.py``): a logging call, a ``HeaderTuple`` and an integer
codec call per field, and a table search per field it encodes. Same interface, same
exceptions (h2 turns them into connection errors, as with hpack's own codec).

Encoder: stateless. It never uses the dynamic table: its first block starts with a
dynamic table size update to 0 (RFC 7541 §6.3), so a later SETTINGS_HEADER_TABLE_SIZE
from the peer needs no further update (§4.2: ours is 0, within any maximum). A field is a
full static-table index where there is one, else a literal without indexing (never
indexed for a sensitive field, §6.2.3 and §7.1.3) with the name by static index where
there is one, strings raw (no Huffman). Since a field's encoding does not depend on the
connection, the blocks of ordinary fields are cached, process-wide, with a bound.

Decoder: all of §6, dynamic table included (peers such as nginx, grpc and h2load index
fields), and the checks hpack makes: indexes in range, strings within the block, valid
Huffman codes and padding (§5.2), size updates only at the start of a block and within
``max_allowed_table_size`` (the value we last had acknowledged), the decoded list bounded
by ``max_header_list_size`` field by field (an HPACK bomb stops at the bound).
Fields sent never-indexed come back as hpack's ``NeverIndexedHeaderTuple`` so that meshd,
passing them on over HTTP/2, keeps them never-indexed; the others as plain tuples.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

from hpack.exceptions import (
    HPACKDecodingError,
    InvalidTableIndexError,
    InvalidTableSizeError,
    OversizedHeaderListError,
)
from hpack.huffman_table import decode_huffman
from hpack.struct import HeaderTuple, NeverIndexedHeaderTuple
from hpack.table import HeaderTable

STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = HeaderTable.STATIC_TABLE
_STATIC_LEN = len(STATIC_TABLE)
_ENTRY_OVERHEAD = 32  # RFC 7541 §4.1
DEFAULT_TABLE_SIZE = 4096  # RFC 9113 §6.5.2, SETTINGS_HEADER_TABLE_SIZE's initial value
DEFAULT_MAX_HEADER_LIST_SIZE = 1 << 16
_MAX_INTEGER_BYTES = 5  # continuation bytes: values up to 2**35, far above every limit

# -- encoding -------------------------------------------------------------------------------

_FULL_INDEX: dict[tuple[bytes, bytes], int] = {}
_NAME_INDEX: dict[bytes, int] = {}
for _i, _field in enumerate(STATIC_TABLE, start=1):
    _FULL_INDEX.setdefault(_field, _i)
    _NAME_INDEX.setdefault(_field[0], _i)

_CACHE_LIMIT = 4096
_cache: dict[tuple[bytes, bytes], bytes] = {}


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """§5.1: ``value`` on a ``prefix_bits`` prefix, OR-ed into ``first``."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(data: bytes) -> bytes:
    return _integer(len(data), 7, 0) + data


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def encode_field(name: bytes, value: bytes, sensitive: bool) -> bytes:
    """One field as this encoder sends it (no dynamic table)."""
    if not sensitive:
        index = _FULL_INDEX.get((name, value))
        if index is not None:
            return bytes((0x80 | index,))
    first = 0x10 if sensitive else 0x00  # never indexed / without indexing
    name_index = _NAME_INDEX.get(name)
    head = _integer(name_index, 4, first) if name_index else bytes((first,)) + _string(name)
    return head + _string(value)


class Encoder:
    """h2's ``conn.encoder``: ``encode(headers)`` and a ``header_table_size`` that h2 sets
    from the peer's SETTINGS (accepted and ignored: the table in use stays 0, within any
    maximum)."""

    __slots__ = ("_started",)

    def __init__(self) -> None:
        self._started = False

    @property
    def header_table_size(self) -> int:
        return 0

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        pass

    def encode(self, headers: Iterable[Any], huffman: bool = True) -> bytes:
        parts: list[bytes] = []
        if not self._started:
            parts.append(b"\x20")  # dynamic table size update to 0, once
            self._started = True
        cache = _cache
        for field in headers:
            if len(field) == 2 and not isinstance(field, NeverIndexedHeaderTuple):
                try:
                    block = cache.get(field)
                except TypeError:  # not hashable (a bytearray): encoded, not cached
                    block = encode_field(_as_bytes(field[0]), _as_bytes(field[1]), False)
                if block is None:
                    name, value = _as_bytes(field[0]), _as_bytes(field[1])
                    block = encode_field(name, value, False)
                    if len(cache) >= _CACHE_LIMIT:
                        cache.clear()
                    cache[(name, value)] = block
            else:
                sensitive = (isinstance(field, NeverIndexedHeaderTuple)
                             or (len(field) > 2 and bool(field[2])))
                block = encode_field(_as_bytes(field[0]), _as_bytes(field[1]), sensitive)
            parts.append(block)
        return b"".join(parts)


# -- decoding -------------------------------------------------------------------------------

def _decode_integer(data: bytes, pos: int, mask: int) -> tuple[int, int]:
    """§5.1: the integer whose prefix (``mask``) is in ``data[pos]``; (value, next pos)."""
    value = data[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    end = len(data)
    for _ in range(_MAX_INTEGER_BYTES):
        if pos >= end:
            raise HPACKDecodingError("Truncated integer in the header block")
        byte = data[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise HPACKDecodingError("Integer in the header block too large")


def _decode_string(data: bytes, pos: int) -> tuple[bytes, int]:
    """§5.2: a string literal at ``pos``; (bytes, next pos)."""
    if pos >= len(data):
        raise HPACKDecodingError("Truncated header block: a string is missing")
    huffman = data[pos] & 0x80
    length, pos = _decode_integer(data, pos, 0x7F)
    end = pos + length
    if end > len(data):
        raise HPACKDecodingError("Truncated header block: a string runs past its end")
    raw = data[pos:end]
    return (decode_huffman(raw) if huffman else raw), end


class Decoder:
    """h2's ``conn.decoder``: ``decode(block, raw=True)``, ``max_header_list_size``,
    ``max_allowed_table_size`` (set by h2 when our SETTINGS are acknowledged) and
    ``header_table_size`` (the size the peer's encoder chose, by its size updates)."""

    __slots__ = ("max_header_list_size", "max_allowed_table_size", "_maxsize", "_size",
                 "_dynamic")

    def __init__(self, max_header_list_size: int = DEFAULT_MAX_HEADER_LIST_SIZE) -> None:
        self.max_header_list_size = max_header_list_size
        self.max_allowed_table_size = DEFAULT_TABLE_SIZE
        self._maxsize = DEFAULT_TABLE_SIZE
        self._size = 0
        self._dynamic: deque[tuple[bytes, bytes]] = deque()  # newest first (index 62)

    @property
    def header_table_size(self) -> int:
        return self._maxsize

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._maxsize = value
        self._evict(0)

    def _evict(self, room: int) -> None:
        dynamic = self._dynamic
        while dynamic and self._size + room > self._maxsize:
            name, value = dynamic.pop()
            self._size -= len(name) + len(value) + _ENTRY_OVERHEAD

    def _add(self, name: bytes, value: bytes) -> None:
        """§4.4: an entry larger than the table empties it and is not added."""
        size = len(name) + len(value) + _ENTRY_OVERHEAD
        if size > self._maxsize:
            self._dynamic.clear()
            self._size = 0
            return
        self._evict(size)
        self._dynamic.appendleft((name, value))
        self._size += size

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index <= _STATIC_LEN:
            return STATIC_TABLE[index - 1]
        slot = index - _STATIC_LEN - 1
        if 0 <= slot < len(self._dynamic):
            return self._dynamic[slot]
        raise InvalidTableIndexError(f"Invalid table index {index}")

    def decode(self, data: bytes | bytearray | memoryview,
               raw: bool = False) -> list[tuple[Any, Any]]:
        data = bytes(data)
        headers: list[tuple[Any, Any]] = []
        pos, end = 0, len(data)
        inflated = 0
        limit = self.max_header_list_size
        while pos < end:
            first = data[pos]
            if first & 0x80:  # §6.1 indexed field
                index = first & 0x7F
                if index == 0x7F:
                    index, pos = _decode_integer(data, pos, 0x7F)
                else:
                    pos += 1
                field = self._entry(index)
            elif first & 0x20 and not first & 0x40:  # §6.3 dynamic table size update
                if headers:
                    raise HPACKDecodingError("Table size update not at the start of the block")
                size, pos = _decode_integer(data, pos, 0x1F)
                if size > self.max_allowed_table_size:
                    raise InvalidTableSizeError("Encoder exceeded max allowable table size")
                self.header_table_size = size
                continue
            else:  # §6.2 literals: incremental indexing (01), without (0000), never (0001)
                mask = 0x3F if first & 0x40 else 0x0F
                index, pos = _decode_integer(data, pos, mask)
                if index:
                    name = self._entry(index)[0]
                else:
                    name, pos = _decode_string(data, pos)
                value, pos = _decode_string(data, pos)
                if first & 0x40:
                    self._add(name, value)
                    field = (name, value)
                elif first & 0x10:
                    field = NeverIndexedHeaderTuple(name, value)
                else:
                    field = (name, value)
            inflated += len(field[0]) + len(field[1]) + _ENTRY_OVERHEAD
            if inflated > limit:
                raise OversizedHeaderListError(
                    f"A header list larger than {limit} has been received")
            headers.append(field)
        if self._maxsize > self.max_allowed_table_size:
            raise InvalidTableSizeError("Encoder did not shrink table size to within the max")
        if raw:
            return headers
        try:
            return [_text(field) for field in headers]
        except UnicodeDecodeError as e:
            raise HPACKDecodingError("Unable to decode headers as UTF-8") from e


def _text(field: tuple[bytes, bytes]) -> HeaderTuple:
    cls = NeverIndexedHeaderTuple if isinstance(field, NeverIndexedHeaderTuple) else HeaderTuple
    return cls(field[0].decode("utf-8"), field[1].decode("utf-8"))


def install(conn: Any, max_header_list_size: int = DEFAULT_MAX_HEADER_LIST_SIZE) -> None:
    """Put this codec into a new h2 connection (before its first frame)."""
    conn.encoder = Encoder()
    conn.decoder = Decoder(max_header_list_size)
