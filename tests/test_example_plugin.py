"""The copy-me example plugin (plugins/example, distribution meshd-example-jsonurl),
installed as its own distribution: `meshd plugins` lists it and a real meshd routes with it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import pytest

from meshd.testing.harness import http_get, wait_for

DIST = "meshd-example-jsonurl"


def installed_version() -> str:
    try:
        return version(DIST)
    except PackageNotFoundError:
        pytest.fail(f"{DIST} is not installed: pip install -e plugins/example (the Makefile's "
                    f"PLUGINS installs it)")


@pytest.fixture
def json_url() -> Iterator[tuple[str, dict[str, Any]]]:
    """A URL serving the returned dict as JSON (mutate it to change the answer)."""
    document: dict[str, Any] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            body = json.dumps(document).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/services.json", document
    httpd.shutdown()
    httpd.server_close()


def test_meshd_plugins_lists_the_example() -> None:
    out = subprocess.run([sys.executable, "-m", "meshd", "plugins"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()]
    assert ["discovery", "jsonurl", DIST, installed_version(), "ok"] in rows, out.stdout


def test_meshd_routes_with_the_example_plugin(mesh, backends, json_url) -> None:
    installed_version()
    url, document = json_url
    a, b = backends("a"), backends("b")
    document["web"] = [a.address]
    text, ports = mesh.config({}, workers=1, extra='[service.web]\ndiscovery = "inventory"\n')
    text = text.replace("[[listener]]", f'''[[discovery]]
name = "inventory"
plugin = "jsonurl"
url = "{url}"
interval = "100ms"

[[listener]]''', 1)
    mesh.start(text, ports)

    def who() -> str:
        status, headers, _ = http_get("127.0.0.1", ports["outbound"], "/", {"Host": "web"})
        return headers.get("x-backend", f"status {status}")

    assert {who() for _ in range(5)} == {"a"}
    document["web"] = [b.address]
    wait_for(lambda: {who() for _ in range(5)} == {"b"}, timeout=3, interval=0.02,
             what="traffic to follow the JSON document")
    _, _, raw = http_get("127.0.0.1", ports["admin"], "/endpoints")
    described = json.loads(raw)
    assert described["sources"]["inventory"]["distribution"] == (
        f"plugin jsonurl from {DIST} {installed_version()}")
