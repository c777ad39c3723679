"""The admin endpoint's self-description through a real meshd: ``meshd_build_info`` on
/metrics, and /config (the effective config as JSON, secrets masked)."""

from __future__ import annotations

import platform
import re
import ssl

import gevent
import h2

import meshd
from meshd.testing.harness import http_get

_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _admin(m, path: str) -> tuple[int, bytes]:
    host, port = m.admin.rsplit(":", 1)
    status, _, body = http_get(host, int(port), path)
    return status, body


def test_build_info_names_the_versions(mesh, backends):
    a = backends("a")
    m = mesh.run({"web": [a.address]}, workers=1)
    status, body = _admin(m, "/metrics")
    assert status == 200
    text = body.decode()
    assert "# TYPE meshd_build_info gauge" in text
    lines = [line for line in text.splitlines() if line.startswith("meshd_build_info{")]
    assert len(lines) == 1, text
    labels_text, value = lines[0][len("meshd_build_info{"):].rsplit("} ", 1)
    assert float(value) == 1
    labels = dict(_LABEL.findall(labels_text))
    assert _LABEL.sub("", labels_text).strip(",") == ""  # nothing but label pairs
    assert labels == {"version": meshd.__version__, "python": platform.python_version(),
                      "gevent": gevent.__version__, "h2": h2.__version__,
                      "openssl": ssl.OPENSSL_VERSION}
