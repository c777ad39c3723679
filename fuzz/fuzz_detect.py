"""Fuzz target: protocol detection (meshd.proto.detect).

The input is what a client sends first; the target replays how the listener peeks it
(``meshd.worker.client.auto``): a growing prefix, non-final until the last call.

Invariants:
- ``detect`` returns a ``Detection``, never NEED_MORE on a final call nor on a prefix of
  ``PEEK_LIMIT`` bytes or more;
- it never reads past its peek bound: bytes after ``PEEK_LIMIT`` change nothing;
- a decision, once made, never changes as more bytes arrive (final or not);
- what it decides is what the bytes say: HTTP2 starts with the preface, TUNNEL with the
  tunnel prefix and a CRLF in its line, TLS with a handshake record, HTTP1 with a method
  and a space;
- ``parse_tunnel`` (called, as the listener does, on what detection called TUNNEL) and
  ``client_hello_info`` never raise; a parsed tunnel port is 1-65535 and the bytes after
  its line are the input's tail; a ClientHello found is one that
  ``detect`` calls TLS, its SNI lowercase ASCII and its ALPN names non-empty.
"""

from __future__ import annotations

from meshd.proto import detect as d

MAX_LEN = d.PEEK_LIMIT + 64
_STEPS = 48  # prefixes checked besides the whole input: the first bytes one by one, then spread


def _prefix_lengths(n: int) -> list[int]:
    cuts = set(range(min(n, _STEPS) + 1))
    cuts.update(n * i // _STEPS for i in range(_STEPS))
    cuts.update(k for k in (d.PEEK_LIMIT - 1, d.PEEK_LIMIT) if k <= n)
    return sorted(cuts | {n})


def one_input(data: bytes) -> None:
    decided: tuple[int, d.Detection] | None = None
    for k in _prefix_lengths(len(data)):
        prefix = data[:k]
        result = d.detect(prefix, final=False)
        assert isinstance(result, d.Detection)
        final = d.detect(prefix, final=True)
        assert isinstance(final, d.Detection) and final is not d.Detection.NEED_MORE
        if k >= d.PEEK_LIMIT:
            assert result is final, (k, result, final)
        if decided is not None:
            assert result is decided[1] and final is decided[1], (decided, k, result, final)
        elif result is not d.Detection.NEED_MORE:
            assert final is result, (k, result, final)
            decided = (k, result)
        _what_it_says(prefix, final)
    # The peek bound, whatever the input's length: the input repeated to PEEK_LIMIT bytes,
    # then bytes past the bound (the input again, or junk) decide nothing.
    if data:
        full = (data * (d.PEEK_LIMIT // len(data) + 1))[: d.PEEK_LIMIT]
        verdict = d.detect(full, final=True)
        for tail in (data, b"\r\n", b"\x00" * 8, b" HTTP/1.1\r\n"):
            assert d.detect(full + tail, final=False) is verdict, (tail, verdict)

    verdict = d.detect(data, final=True)
    tunnel = d.parse_tunnel(data) if verdict is d.Detection.TUNNEL else None  # as the caller
    if tunnel is not None:
        port, rest = tunnel
        assert 1 <= port <= 65535 and data.endswith(rest)
    hello = d.client_hello_info(data)
    if hello is not None:
        assert verdict is d.Detection.TLS
        assert hello.sni is None or (hello.sni.isascii() and hello.sni == hello.sni.lower()
                                     and hello.sni)
        assert all(isinstance(p, str) and p for p in hello.alpn)


def _what_it_says(prefix: bytes, result: d.Detection) -> None:
    if result is d.Detection.HTTP2:
        assert prefix.startswith(d.H2_PREFACE)
    elif result is d.Detection.TUNNEL:
        assert prefix.startswith(d.TUNNEL_PREFIX)
        assert b"\r\n" in prefix[: len(d.TUNNEL_PREFIX) + 7]
    elif result is d.Detection.TLS:
        assert prefix[0] == 0x16 and prefix[1] == 0x03 and prefix[5] == 0x01
    elif result is d.Detection.HTTP1:
        line = prefix[2:] if prefix.startswith(b"\r\n") else prefix
        method = line.split(b" ", 1)[0]
        assert method and b" " in line and not any(c < 0x21 or c > 0x7E for c in method), prefix
