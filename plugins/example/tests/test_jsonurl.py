"""The jsonurl example plugin, proven offline with meshd's plugin test kit: WatchRecorder
drives ``watch()`` as meshd would, and a tiny http.server plays the JSON URL."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from meshd_example import JsonUrlBackend

from meshd.discovery import Endpoint, NoSuchService, Reset
from meshd.errors import ConfigError
from meshd.testing.watch import WatchRecorder


class JsonServer:
    """Serves ``document`` as JSON with a strong ETag; answers 304 to a matching
    If-None-Match; ``status`` other than 200 fails every request."""

    def __init__(self) -> None:
        self.document: Any = {}
        self.status = 200
        self.answers: list[int] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                body = json.dumps(outer.document).encode()
                etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
                if outer.status != 200:
                    code, body = outer.status, b"broken"
                elif self.headers.get("If-None-Match") == etag:
                    code, body = 304, b""
                else:
                    code = 200
                outer.answers.append(code)
                self.send_response(code)
                if code in (200, 304):
                    self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/services.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[JsonServer]:
    s = JsonServer()
    yield s
    s.close()


def test_endpoints_follow_the_document(server: JsonServer) -> None:
    server.document = {"web": ["10.0.0.1:80", "[::1]:8080"]}
    backend = JsonUrlBackend("inv", {"url": server.url, "interval": "50ms"})
    web, api = WatchRecorder(backend, "web"), WatchRecorder(backend, "api")
    assert web.next() == Reset((Endpoint("10.0.0.1", 80), Endpoint("::1", 8080)))
    assert api.next() == NoSuchService()
    server.document = {"web": ["10.0.0.2:80"], "api": ["10.0.1.1:80"]}
    assert web.next(2) == Reset((Endpoint("10.0.0.2", 80),))
    assert api.next(2) == Reset((Endpoint("10.0.1.1", 80),))
    time.sleep(0.3)
    assert len(web.updates) == 2                  # unchanged polls yield nothing
    assert 304 in server.answers                  # ... and cost the server no body (ETag)
    started = time.monotonic()
    web.close()
    api.close()
    assert time.monotonic() - started < 1         # close() ends the watches at once


def test_errors_are_raised_naming_the_url(server: JsonServer) -> None:
    server.document = {"web": "10.0.0.1:80"}
    rec = WatchRecorder(JsonUrlBackend("inv", {"url": server.url}), "web")
    assert str(rec.wait_error(2)) == f'{server.url}: web: expected a list of "host:port"'
    server.status = 500
    rec = WatchRecorder(JsonUrlBackend("inv", {"url": server.url}), "web")
    assert str(rec.wait_error(2)) == f"{server.url}: HTTP 500 Internal Server Error"
    server.close()
    rec = WatchRecorder(JsonUrlBackend("inv", {"url": server.url}), "web")
    assert "Connection refused" in str(rec.wait_error(2))


def test_options_are_validated_with_key_names() -> None:
    with pytest.raises(ConfigError) as info:
        JsonUrlBackend("inv", {"url": "ftp://x", "interval": "5", "extra": 1})
    assert info.value.problems == [
        ("extra", "unknown key"),
        ("url", "expected an http:// or https:// URL, got 'ftp://x'"),
        ("interval", 'expected a duration with a unit (ms, s, m, h) like "10s", got \'5\''),
    ]
