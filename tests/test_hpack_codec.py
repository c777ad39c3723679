"""meshd's HPACK codec against the hpack package (the reference h2 ships with).

Decoder: on blocks hpack's Encoder produces (dynamic table, Huffman or not, never-indexed
fields, table size changes) both decoders give the same fields; on mutated and random
bytes, one rejects exactly when the other does. Encoder: hpack's Decoder reads back what it
wrote, sensitive fields included, whatever table size the peer allows.
"""

from __future__ import annotations

import hpack
import pytest
from hpack.exceptions import (
    HPACKDecodingError,
    InvalidTableIndexError,
    InvalidTableSizeError,
    OversizedHeaderListError,
)
from hpack.struct import HeaderTuple, NeverIndexedHeaderTuple
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd.proto import hpack_codec
from meshd.proto.hpack_codec import Decoder, Encoder

STATIC = list(hpack_codec.STATIC_TABLE)
names = st.one_of(st.sampled_from([n for n, _ in STATIC]),
                  st.binary(min_size=1, max_size=20).map(bytes.lower))
values = st.one_of(st.sampled_from([v for _, v in STATIC]), st.binary(max_size=60))
fields = st.one_of(st.sampled_from(STATIC), st.tuples(names, values))
field_lists = st.lists(st.tuples(fields, st.booleans()), max_size=12)


def _plain(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes, bool]]:
    return [(bytes(n), bytes(v), isinstance(h, NeverIndexedHeaderTuple))
            for h in headers for n, v in [h]]


def _outcome(decoder: object, block: bytes) -> object:
    try:
        return _plain(decoder.decode(block, raw=True))  # type: ignore[attr-defined]
    except HPACKDecodingError:
        return "refused"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=st.lists(field_lists, min_size=1, max_size=6), huffman=st.booleans(),
       sizes=st.lists(st.sampled_from([None, 0, 64, 256, 4096]), min_size=6, max_size=6))
def test_blocks_from_hpacks_encoder_decode_as_hpack_decodes_them(
        blocks: list[list[tuple[tuple[bytes, bytes], bool]]], huffman: bool,
        sizes: list[int | None]) -> None:
    encoder = hpack.Encoder()
    ours, theirs = Decoder(), hpack.Decoder()
    for block_fields, size in zip(blocks, sizes, strict=False):
        if size is not None:  # our SETTINGS_HEADER_TABLE_SIZE changed, and was acknowledged
            ours.max_allowed_table_size = theirs.max_allowed_table_size = size
            encoder.header_table_size = size
        headers = [NeverIndexedHeaderTuple(*f) if sensitive else HeaderTuple(*f)
                   for f, sensitive in block_fields]
        block = encoder.encode(headers, huffman=huffman)
        expected = _plain(theirs.decode(block, raw=True))
        assert _plain(ours.decode(block, raw=True)) == expected
        assert [(n, v) for n, v, _ in expected] == [tuple(h) for h in headers]
        assert ours.header_table_size == theirs.header_table_size


@settings(max_examples=400, deadline=None)
@given(block=field_lists, data=st.data())
def test_mutated_and_random_blocks_are_refused_exactly_when_hpack_refuses_them(
        block: list[tuple[tuple[bytes, bytes], bool]], data: st.DataObject) -> None:
    encoded = bytearray(hpack.Encoder().encode(
        [(n, v, s) for (n, v), s in block], huffman=data.draw(st.booleans())))
    for _ in range(data.draw(st.integers(0, 4))):
        if not encoded:
            break
        i = data.draw(st.integers(0, len(encoded) - 1))
        choice = data.draw(st.integers(0, 2))
        if choice == 0:
            encoded[i] = data.draw(st.integers(0, 255))
        elif choice == 1:
            del encoded[i:]
        else:
            encoded[i:i] = data.draw(st.binary(min_size=1, max_size=4))
    if data.draw(st.booleans()):
        encoded = bytearray(data.draw(st.binary(max_size=40)))
    blob = bytes(encoded)
    assert _outcome(Decoder(), blob) == _outcome(hpack.Decoder(), blob)


@settings(max_examples=200, deadline=None)
@given(blocks=st.lists(field_lists, min_size=1, max_size=5),
       peer_size=st.sampled_from([0, 1, 100, 4096, 65536]))
def test_hpacks_decoder_reads_what_the_encoder_writes(
        blocks: list[list[tuple[tuple[bytes, bytes], bool]]], peer_size: int) -> None:
    encoder, decoder = Encoder(), hpack.Decoder()
    encoder.header_table_size = peer_size  # the peer's SETTINGS_HEADER_TABLE_SIZE
    decoder.max_allowed_table_size = peer_size
    for block_fields in blocks:
        headers = [NeverIndexedHeaderTuple(*f) if sensitive else f
                   for f, sensitive in block_fields]
        got = decoder.decode(encoder.encode(headers), raw=True)
        assert _plain(got) == [(n, v, s) for (n, v), s in block_fields]
        assert decoder.header_table_size == 0  # nothing ever indexed


def test_the_first_block_sets_the_table_to_zero_and_fields_use_the_static_table() -> None:
    encoder = Encoder()
    first = encoder.encode([(b":method", b"GET"), (b":path", b"/a"), (b"x-y", b"z")])
    assert first == b"\x20\x82\x04\x02/a\x00\x03x-y\x01z"
    assert encoder.encode([(b":method", b"GET")]) == b"\x82"  # the update only once
    assert encoder.encode([NeverIndexedHeaderTuple(b"authorization", b"k")]) \
        == b"\x1f\x08\x01k"  # never indexed, name index 23 on a 4-bit prefix
    assert encoder.encode([(b"cookie", b"c", True)]) == b"\x1f\x11\x01c"


def test_values_of_other_types_are_encoded_as_their_bytes() -> None:
    block = Encoder().encode([(b"x-a", bytearray(b"1")), ("x-b", "2"), (b"x-c", memoryview(b"3"))])
    assert hpack.Decoder().decode(block, raw=True) == [(b"x-a", b"1"), (b"x-b", b"2"),
                                                       (b"x-c", b"3")]


def test_the_encoders_cache_is_bounded() -> None:
    encoder = Encoder()
    for i in range(3 * hpack_codec._CACHE_LIMIT):
        encoder.encode([(b"x-request-id", str(i).encode())])
    assert 0 < len(hpack_codec._cache) <= hpack_codec._CACHE_LIMIT


def test_a_header_list_bomb_stops_at_the_bound() -> None:
    """One 4 KiB-ish dynamic entry, then a block of indexes to it: the decoder refuses
    at the bound rather than building the list (an HPACK bomb)."""
    decoder = Decoder(max_header_list_size=16384)
    big = hpack.Encoder()
    decoder.decode(big.encode([(b"x-big", b"v" * 4000)], huffman=False))
    with pytest.raises(OversizedHeaderListError):  # not the bad index at the very end:
        decoder.decode(b"\xbe" * 100_000 + b"\x80")  # the bound holds field by field


@pytest.mark.parametrize("block, error", [
    (b"\x80", InvalidTableIndexError),                       # index 0
    (b"\xbe", InvalidTableIndexError),                       # index 62, empty table
    (b"\x82\x20", HPACKDecodingError),                       # size update after a field
    (b"\x3f\xe2\x1f", InvalidTableSizeError),                # update to 4097 > 4096
    (b"\x00\x05ab", HPACKDecodingError),                     # name runs past the end
    (b"\x7f", HPACKDecodingError),                           # truncated integer
    (b"\xff" + b"\xff" * 8 + b"\x01", HPACKDecodingError),   # integer too large
    (b"\x00\x81\xff\x01a", HPACKDecodingError),              # Huffman EOS / bad padding
])
def test_malformed_blocks_are_decoding_errors(block: bytes, error: type) -> None:
    with pytest.raises(error):
        Decoder().decode(block, raw=True)


def test_a_table_left_above_a_lowered_maximum_is_an_error() -> None:
    """After our SETTINGS lowered the table to 0 (and were acknowledged), a peer that
    does not shrink its table with a size update is refused (RFC 7541 §4.2)."""
    decoder = Decoder()
    decoder.max_allowed_table_size = 0
    with pytest.raises(InvalidTableSizeError):
        decoder.decode(b"\x82")
    decoder = Decoder()
    decoder.max_allowed_table_size = 0
    assert decoder.decode(b"\x20\x82", raw=True) == [(b":method", b"GET")]


def test_text_mode_decodes_utf8_and_keeps_never_indexed() -> None:
    block = hpack.Encoder().encode([NeverIndexedHeaderTuple(b"x-k", "é".encode())])
    (field,) = Decoder().decode(block)
    assert field == ("x-k", "é") and isinstance(field, NeverIndexedHeaderTuple)
