"""The admin endpoint's self-description through a real meshd: ``meshd_build_info`` on
/metrics, and /config (the effective config as JSON, secrets masked)."""

from __future__ import annotations

import http.client
import json
import platform
import re
import ssl
import textwrap
import tomllib

import gevent
import h2

import meshd
from meshd import config as config_mod
from meshd.control.config_view import MASK, effective
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


def test_config_is_the_effective_config(mesh, backends, tmp_path):
    a = backends("a")
    log = tmp_path / "access.log"
    m = mesh.run({"web": [a.address]}, workers=1,
                 extra=f'[access_log]\npath = "{log}"\n[service.web]\ntimeout = "7s"\n')
    status, body = _admin(m, "/config")
    assert status == 200
    cfg = json.loads(body)
    assert cfg["workers"] == 1 and cfg["path"] == str(m.config_path)
    (lst,) = cfg["listeners"]
    assert lst["name"] == "outbound" and lst["listen"] == f"127.0.0.1:{m.ports['outbound']}"
    assert lst["direction"] == "outbound"
    assert cfg["services"]["web"]["timeout"] == 7.0
    assert cfg["access_log"] == {"path": str(log), "format": "text", "queue": 4096}
    assert cfg["admin"]["listen"] == m.admin
    assert cfg["discovery"][0]["options"]["services"] == {"web": [a.address]}
    # GET only, as every admin path
    host, port = m.admin.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", "/config")
    assert conn.getresponse().status == 405
    conn.close()


def test_config_masks_secrets_in_plugin_options(tmp_path):
    """What /config serves (``config_view.effective`` of the parsed config): the plugins
    shipped with meshd take secrets only from files, so a third-party plugin's inline
    ``token`` is what this guards; such options reach the config as written."""
    text = textwrap.dedent(f"""\
        workers = 1
        shm_dir = "{tmp_path}"
        [[discovery]]
        name = "vault-ish"
        plugin = "thirdparty"
        token = "s3cr3t-token"
        api_token = "also-secret"
        token_file = "/etc/meshd/token"
        address = "https://meshd:hunter2@vault.example:8200/v1"
        [discovery.auth]
        password = "pw"
        client_secret = "cs"
        username = "meshd"
        [identity]
        provider = "files"
        cert_file = "/x/tls.crt"
        key_file = "/x/tls.key"
        ca_file = "/x/ca.crt"
        passphrase_password = "pp"
        [[listener]]
        name = "o"
        listen = "127.0.0.1:1"
        """)
    config = config_mod.parse(tomllib.loads(text), check_files=False)
    served = json.loads(json.dumps(effective(config)))
    opts = served["discovery"][0]["options"]
    assert opts["token"] == MASK and opts["api_token"] == MASK
    assert opts["token_file"] == "/etc/meshd/token"  # a path, not the secret
    assert opts["address"] == f"https://meshd:{MASK}@vault.example:8200/v1"
    assert opts["auth"] == {"password": MASK, "client_secret": MASK, "username": "meshd"}
    ident = served["identity"]["options"]
    assert ident["passphrase_password"] == MASK and ident["key_file"] == "/x/tls.key"
    assert "s3cr3t" not in json.dumps(served) and "hunter2" not in json.dumps(served)
