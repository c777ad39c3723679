"""Write the seed corpus, ``fuzz/corpus/<target>/`` (``python -m fuzz.seeds``).

A few well-formed inputs per target, and a few just over the edge, so that the fuzzer
starts inside every branch's reach; its own finds stay out of the repo (.fuzz/).
The files are committed; this script says where they came from.
"""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path

from fuzz.fuzz_h2_headers import encode_header_list
from fuzz.fuzz_hpack import SEPARATOR

CORPUS = Path(__file__).resolve().parent / "corpus"

REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: web\r\n\r\n",
    b"GET http://web:8080/a?b=c HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, x-hop\r\n"
    b"x-hop: 1\r\nTE: trailers\r\n\r\n",
    b"POST /upload HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    b"POST /c HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: gzip, chunked\r\nCookie: a=1\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"\r\nOPTIONS * HTTP/1.0\r\nX-A:\t v \r\n\r\n",
    b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n",
]
RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x\r\n\r\n",
    b"HTTP/1.0 204\r\nConnection: keep-alive\r\n\r\n",
    b"HTTP/1.1 502 \xc3\xa9\r\nContent-Length: 3, 3\r\nConnection: close\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
]
CHUNKED = [
    b"5\r\nhello\r\n0\r\n\r\n",
    b"3;ext=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\ngrpc-status: 0\r\nx: y\r\n\r\nGET /next",
    b"00000\r\n\r\n",
    b"ffffffffffffffff\r\n",
]
GOOD_H2 = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/a?b=c"),
           (b":authority", b"web:8080"), (b"user-agent", b"curl/8"), (b"te", b"trailers"),
           (b"cookie", b"a=1"), (b"cookie", b"b=2")]
H2_LISTS = [
    (0, GOOD_H2),
    (4, GOOD_H2),
    (0, [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/p"), (b"host", b"web"),
         (b"content-length", b"3")]),
    (0, [(b":method", b"CONNECT"), (b":authority", b"db:5432")]),
    (1, [(b"grpc-status", b"0"), (b"grpc-message", b"ok")]),
    (2, [(b":status", b"200"), (b"content-type", b"application/grpc")]),
    (2, [(b":status", b"2000"), (b"Connection", b"x")]),
]


def _client_hello() -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname="Web.Example")
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def _hpack_blocks() -> list[bytes]:
    from meshd.proto.hpack_codec import Encoder
    plain = Encoder().encode(GOOD_H2)
    # Incremental indexing, then a reference to the new dynamic entry; a size update;
    # a Huffman-coded value (www.example.com, RFC 7541 C.4.1); a never-indexed field.
    indexed = b"\x40\x03x-a\x01b" + b"\xbe"
    huffman = b"\x82\x86\x84\x41\x8c\xf1\xe3\xc2\xe5\xf2\x3a\x6b\xa0\xab\x90\xf4\xff"
    return [
        b"\x02" + plain,
        b"\x02" + indexed + SEPARATOR + b"\xbe\x3f\xe1\x1f",
        b"\x02" + huffman + SEPARATOR + b"\x20" + SEPARATOR + b"\x10\x03x-b\x02no",
        b"\x80" + b"x-a\xfeb\xff\x01secret\xfev\xff:path\xfe/",
    ]


def main() -> None:
    seeds = {
        "http1": [b"\x00" + r for r in REQUESTS] + [b"\x01" + r for r in RESPONSES]
        + [bytes((2 | flags,)) + c for c in CHUNKED for flags in (0, 4)],
        "h2_headers": [bytes((mode,)) + encode_header_list(h) for mode, h in H2_LISTS]
        + [bytes((3 | flags,)) + r for r in REQUESTS[:4] for flags in (0, 12)],
        "hpack": _hpack_blocks(),
        "detect": [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04", REQUESTS[1],
                   b"MESHD-TUNNEL 5432\r\n\x00\x00\x00\x08", b"\x00\x00\x00\x08\x04\xd2\x16/",
                   b"SSH-2.0-OpenSSH_9.2\r\n", _client_hello()],
    }
    for name, inputs in seeds.items():
        folder = CORPUS / name
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
        for data in inputs:
            (folder / hashlib.sha1(data).hexdigest()[:16]).write_bytes(data)
        print(f"{name}: {len(inputs)} seeds")


if __name__ == "__main__":
    main()
