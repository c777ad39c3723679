"""Fuzz target: meshd's HPACK codec (meshd.proto.hpack_codec).

The first byte picks the decoder's limits (and, bit 7 set, the encoder mode); the rest
is one or more header blocks separated by the two bytes 0xff 0x00, decoded in order by
one decoder (its dynamic table carries over), exactly as on one connection.

Invariants:
- the decoder raises only hpack's ``HPACKDecodingError`` family (what h2 turns into a
  connection error), never IndexError, ValueError or the like;
- it agrees with the hpack package's decoder, block by block, on the fields (bytes,
  never-indexed kept) and on whether a block is refused; the one allowed difference is
  meshd's bound on integer length (``_MAX_INTEGER_BYTES``), an HPACK bomb bound;
- a decoded list never exceeds ``max_header_list_size`` (RFC 7541 §4.1 measure) and the
  dynamic table never exceeds its size;
- what the decoder returned, encoded by meshd's encoder, decodes to the same list;
- encoder mode: any field list (names and values cut from the input) round-trips.
"""

from __future__ import annotations

import hpack
from hpack.exceptions import HPACKDecodingError
from hpack.struct import NeverIndexedHeaderTuple

from meshd.proto import hpack_codec

MAX_LEN = 4096
SEPARATOR = b"\xff\x00"
_SIZES = (64, 256, 4096, 1 << 16)


def one_input(data: bytes) -> None:
    if not data:
        return
    control, rest = data[0], data[1:]
    if control & 0x80:
        _encode(rest)
        return
    max_list = _SIZES[control & 3]
    max_table = (4096, 256, 64, 0)[(control >> 2) & 3]
    ours = hpack_codec.Decoder(max_list)
    ref = hpack.Decoder(max_header_list_size=max_list)
    ours.max_allowed_table_size = ref.max_allowed_table_size = max_table
    for block in rest.split(SEPARATOR):
        mine = _decode(ours, block)
        theirs = _decode(ref, block)
        if isinstance(mine, str) and "Integer in the header block too large" in mine:
            return  # meshd's bound, stricter than the RFC's unbounded integers
        if isinstance(mine, str) or isinstance(theirs, str):
            assert isinstance(mine, str) and isinstance(theirs, str), (block, mine, theirs)
            return  # a connection error: the connection ends here
        assert mine == theirs, (block, mine, theirs)
        _check_state(ours, mine, max_list)
        _round_trip(mine)


def _decode(decoder: hpack_codec.Decoder | hpack.Decoder, block: bytes
            ) -> list[tuple[bytes, bytes, bool]] | str:
    try:
        fields = decoder.decode(block, raw=True)
    except HPACKDecodingError as e:
        return f"{type(e).__name__}: {e}"
    return [(bytes(f[0]), bytes(f[1]), isinstance(f, NeverIndexedHeaderTuple)) for f in fields]


def _check_state(dec: hpack_codec.Decoder, fields: list[tuple[bytes, bytes, bool]],
                 max_list: int) -> None:
    assert sum(len(n) + len(v) + 32 for n, v, _ in fields) <= max_list
    size = sum(len(n) + len(v) + 32 for n, v in dec._dynamic)
    assert size == dec._size <= dec.header_table_size <= dec.max_allowed_table_size, \
        (size, dec._size, dec.header_table_size)


def _round_trip(fields: list[tuple[bytes, bytes, bool]]) -> None:
    headers = [NeverIndexedHeaderTuple(n, v) if never else (n, v) for n, v, never in fields]
    block = hpack_codec.Encoder().encode(headers)
    again = _decode(hpack_codec.Decoder(1 << 30), block)
    assert again == fields, (fields, block, again)


def _encode(data: bytes) -> None:
    """Fields cut from the input: separated by 0xff, name from value by the first 0xfe;
    a name starting with 0x01 is sent never-indexed."""
    fields = []
    for part in data.split(b"\xff"):
        name, _, value = part.partition(b"\xfe")
        never = name[:1] == b"\x01"
        fields.append((name, value, never))
    _round_trip(fields)
