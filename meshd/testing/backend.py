"""A small HTTP/1.1 backend for tests, the demo and benchmarks (gevent.pywsgi).

    python -m meshd.testing.backend --listen 127.0.0.1:8081 --name a
    python -m meshd.testing.backend --listen 127.0.0.1:8443 --tls-cert C --tls-key K  # HTTPS

Over TLS it selects ALPN "http/1.1" when the client offers it (it speaks nothing else).

Routes (anything else answers ``NAME PATH``):
  /echo            streams the request body back (Content-Length when the request had one,
                   else chunked)
  /upload          reads the body, answers {"bytes": n, "sha256": ...}
  /bytes?n=N       N bytes of b"x", chunked (add &cl=1 for Content-Length)
  /slow?ms=N       answers after N ms
  /status?code=N   answers with that status (no body for 204 and 304)
  /silent          never answers (until the client goes away or 600 s pass)
  /headers         the request headers as JSON
  /pid             the backend's pid
  /proto           "PROTOCOL SCHEME CLIENT-PORT", e.g. "HTTP/1.1 https 40312"
  /_delay?ms=N     from now on, every other request waits N ms before answering
  /_fail?code=N    from now on, every other request answers N (0: normally again)
  /_counts         JSON {"METHOD /path": n}: the requests received so far (every path but
                   these /_ ones, counted on arrival, before /_delay or /_fail act;
                   add ?reset=1 to start counting from zero again)
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import parse_qs  # noqa: E402

import gevent  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

CHUNK = 65536


def make_app(name: str) -> Callable[[dict[str, Any], Callable[..., Any]], Any]:
    faults = {"delay_ms": 0, "fail": 0}  # set through /_delay and /_fail
    counts: Counter[str] = Counter()      # read (and reset) through /_counts

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "/")
        query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        base = [("x-backend", name)]
        body_in = environ["wsgi.input"]
        if path in ("/_delay", "/_fail"):
            faults["delay_ms" if path == "/_delay" else "fail"] = int(
                query.get("ms", query.get("code", "0")))
            start_response("200 OK", base + [("Content-Length", "3")])
            return [b"ok\n"]
        if path == "/_counts":
            out = json.dumps(dict(counts)).encode()
            if query.get("reset"):
                counts.clear()
            start_response("200 OK", base + [("Content-Type", "application/json"),
                                             ("Content-Length", str(len(out)))])
            return [out]
        counts[f"{environ.get('REQUEST_METHOD', '')} {path}"] += 1
        if faults["delay_ms"]:
            gevent.sleep(faults["delay_ms"] / 1000)
        if faults["fail"]:
            body_in.read()
            start_response(f"{faults['fail']} Injected", base + [("Content-Length", "9")])
            return [b"injected\n"]
        if path == "/echo":
            length = environ.get("CONTENT_LENGTH")
            headers = base + ([("Content-Length", length)] if length else [])
            start_response("200 OK", headers)

            def stream() -> Iterator[bytes]:
                while data := body_in.read(CHUNK):
                    yield data
            return stream()
        if path == "/upload":
            digest = hashlib.sha256()
            n = 0
            while data := body_in.read(CHUNK):
                n += len(data)
                digest.update(data)
            out = json.dumps({"bytes": n, "sha256": digest.hexdigest()}).encode()
            start_response("200 OK", base + [("Content-Type", "application/json")])
            return [out]
        body_in.read()
        if path == "/bytes":
            n = int(query.get("n", "0"))
            headers = base + ([("Content-Length", str(n))] if query.get("cl") else [])
            start_response("200 OK", headers)

            def produce() -> Iterator[bytes]:
                left = n
                block = b"x" * CHUNK
                while left > 0:
                    piece = block[: min(left, CHUNK)]
                    left -= len(piece)
                    yield piece
            return produce()
        if path == "/slow":
            gevent.sleep(int(query.get("ms", "100")) / 1000)
        elif path == "/status":
            code = int(query.get("code", "200"))
            start_response(f"{code} Status", base + ([] if code in (204, 304) else [("Content-Length", "3")]))
            return [] if code in (204, 304) else [b"%d" % code]
        elif path == "/silent":
            gevent.sleep(600)
        elif path == "/headers":
            hdrs = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
            out = json.dumps(hdrs).encode()
            start_response("200 OK", base + [("Content-Type", "application/json"), ("Content-Length", str(len(out)))])
            return [out]
        elif path == "/proto":
            out = (f"{environ.get('SERVER_PROTOCOL')} {environ.get('wsgi.url_scheme')} "
                   f"{environ.get('REMOTE_PORT')}").encode()
            start_response("200 OK", base + [("Content-Length", str(len(out)))])
            return [out]
        elif path == "/pid":
            out = str(os.getpid()).encode()
            start_response("200 OK", base + [("Content-Length", str(len(out)))])
            return [out]
        out = f"{name} {path}\n".encode()
        start_response("200 OK", base + [("Content-Type", "text/plain"), ("Content-Length", str(len(out)))])
        return [out]

    return app


class _Server(WSGIServer):
    def handle(self, sock: socket.socket, address: Any) -> None:
        # pywsgi may write a response head and body in two sends: without NODELAY,
        # Nagle holds the second until the peer's delayed ACK (40 ms) arrives.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle(sock, address)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8081")
    parser.add_argument("--name", default="backend")
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", help="... and this key (PEM)")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    tls: dict[str, Any] = {}
    if args.tls_cert:
        import ssl
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # gevent's: patched above
        context.load_cert_chain(args.tls_cert, args.tls_key)
        context.set_alpn_protocols(["http/1.1"])
        tls["ssl_context"] = context
    server = _Server((host.strip("[]"), int(port)), make_app(args.name), log=None, **tls)
    gevent.signal_handler(signal.SIGTERM, server.stop)
    server.start()
    print(f"backend {args.name} listening on {args.listen}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
