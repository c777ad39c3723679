"""Each endpoint's expected identity: the static plugin takes ``identity`` (a SPIFFE ID,
checked, with a key path) in an endpoint table, the admin /endpoints JSON carries it and
`meshd endpoints` shows it in its IDENTITY column."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from meshd_static.entries import parse_services

from meshd.cli import cli
from meshd.cli.endpoints import HEADER

WEB_ID = "spiffe://cluster.local/ns/default/sa/web"


def test_meshd_endpoints_shows_each_endpoints_expected_identity(mesh, backends) -> None:
    a, b = backends("a"), backends("b")
    text, ports = mesh.config({"web": []})
    text = text.replace("web = []", (
        f'web = [{{ address = "{a.address}", meshed = true, inbound_port = {a.port}, '
        f'identity = "{WEB_ID}" }}, "{b.address}"]'))
    m = mesh.start(text, ports)
    result = CliRunner().invoke(cli, ["endpoints", "--admin", m.admin], prog_name="meshd")
    assert result.exit_code == 0, result.output
    header, *lines = result.stdout.splitlines()
    assert tuple(header.split()) == HEADER and HEADER[-1] == "IDENTITY"
    rows = {r[1]: r for r in (line.split() for line in lines)}
    assert rows[a.address][-1] == WEB_ID and rows[b.address][-1] == "-"
    result = CliRunner().invoke(cli, ["endpoints", "--admin", m.admin, "--json"], prog_name="meshd")
    eps = {e["address"]: e for e in json.loads(result.stdout)["services"]["web"]["endpoints"]}
    assert eps[a.address]["identity"] == WEB_ID and "identity" not in eps[b.address]


@pytest.mark.parametrize(("entry", "message"), [
    ({"address": "10.0.0.1:80", "meshed": True, "identity": "http://web"},
     "'http://web' is not a SPIFFE ID (spiffe://TRUST-DOMAIN/PATH)"),
    ({"address": "10.0.0.1:80", "meshed": True, "identity": "spiffe://Cluster/web"},
     "the trust domain 'Cluster' is not lowercase"),
    ({"address": "10.0.0.1:80", "meshed": True, "identity": 7},
     "expected a SPIFFE ID string, got 7"),
    ({"address": "10.0.0.1:80", "identity": WEB_ID}, "only used with meshed = true"),
])
def test_the_static_plugin_checks_identity_with_a_key_path(entry, message) -> None:
    problems: list[tuple[str, str]] = []
    parse_services({"web": ["10.0.0.2:80", entry]}, "services.", problems)
    assert len(problems) == 1 and problems[0][0] == "services.web[1].identity", problems
    assert message in problems[0][1]


def test_meshd_check_names_the_bad_identity(tmp_path, mesh) -> None:
    text = mesh.config({"web": []})[0].replace(
        "web = []", 'web = [{ address = "10.0.0.1:80", meshed = true, identity = "spiffe://x" }]')
    path = tmp_path / "bad.toml"
    path.write_text(text)
    out = subprocess.run([sys.executable, "-m", "meshd", "check", "-c", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert (f"{path}: discovery[0].services.web[0].identity: 'spiffe://x' has no path "
            "(spiffe://x/...)") in out.stderr, out.stderr
