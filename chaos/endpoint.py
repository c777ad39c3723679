"""The chaos run's endpoint: a small HTTP/1.1 server (gevent.pywsgi) in its own process,
so the scheduler can kill and restart it, make it slow or make it fail.

    python -m chaos.endpoint --listen 127.0.0.1:8081 --name e1 --posts /tmp/e1.posts

Every answer carries ``x-backend: NAME`` (which endpoint answered: how a 503 is traced
to the endpoint made to fail) and echoes ``x-request-id``. A POST's request id is
appended to the ``--posts`` file before the answer (one line each, flushed): the file
outlives a kill, so a POST delivered twice is found even across a restart.

Controls (not counted): ``/_delay?ms=N`` (every later request waits N ms first),
``/_fail?code=N`` (every later request answers N; 0: normally again).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import parse_qs  # noqa: E402

import gevent  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

MAX_BODY = 1 << 20


def make_app(name: str, posts_path: str) -> Callable[..., Any]:
    faults = {"delay_ms": 0, "fail": 0}
    posts = open(posts_path, "a", buffering=1)  # line-buffered: each id on disk at once

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "/")
        rid = environ.get("HTTP_X_REQUEST_ID", "")[:64]
        base = [("x-backend", name), ("x-request-id", rid)]
        if path in ("/_delay", "/_fail"):
            query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
            faults["delay_ms" if path == "/_delay" else "fail"] = int(
                query.get("ms", query.get("code", "0")))
            start_response("200 OK", base + [("Content-Length", "3")])
            return [b"ok\n"]
        body = environ["wsgi.input"].read(MAX_BODY)
        if environ.get("REQUEST_METHOD") == "POST" and rid:
            posts.write(rid + "\n")
        if faults["delay_ms"]:
            gevent.sleep(faults["delay_ms"] / 1000)
        if faults["fail"]:
            start_response(f"{faults['fail']} Injected", base + [("Content-Length", "9")])
            return [b"injected\n"]
        out = body if body else f"{name} {path}\n".encode()
        start_response("200 OK", base + [("Content-Type", "text/plain"),
                                         ("Content-Length", str(len(out)))])
        return [out]

    return app


class _Server(WSGIServer):
    def handle(self, sock: socket.socket, address: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle(sock, address)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--posts", required=True, help="file the POSTs' request ids go to")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    server = _Server((host, int(port)), make_app(args.name, args.posts), log=None,
                     backlog=1024)
    gevent.signal_handler(signal.SIGTERM, server.stop)
    server.serve_forever()


if __name__ == "__main__":
    main()
