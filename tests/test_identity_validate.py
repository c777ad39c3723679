"""The [identity] provider and the [listener.tls] files are checked where discovery
plugins and [service.X.tls] files are (meshd.validate.load_checked, in a forked child for
run and HUP): `meshd check`, `meshd run` and a reload refuse a bad provider name, bad
provider options (keys under ``identity.``) and a listener certificate that does not load
(``listener[i].tls.cert_file``), with the same lines; a refused reload keeps serving."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from meshd.identity import ca
from meshd.testing.harness import http_get, wait_for
from meshd.testing.identity_files import TD, files, identity_toml, leaf, replace_files


def refused_everywhere(mesh, backends, tmp_path: Path, bad_extra: str, lines: list[str]) -> None:
    """`meshd check` and `meshd run` exit 2 with each of ``lines``; a meshd running a
    good config refuses a HUP to the bad one with the same lines and keeps serving."""
    a = backends("a")
    good, ports = mesh.config({"web": [a.address]}, workers=1)
    bad = good + "\n" + bad_extra
    path = tmp_path / "bad.toml"
    path.write_text(bad)
    for command in ("check", "run"):
        out = subprocess.run([sys.executable, "-m", "meshd", command, "-c", str(path)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, (command, out)
        for line in lines:
            assert f"{path}: {line}" in out.stderr, (command, line, out.stderr)
    m = mesh.start(good, ports)
    m.config_path.write_text(bad)
    m.signal(signal.SIGHUP)
    wait_for(lambda: m.metric("meshd_config_reloads_total", 'result="failure"') == 1,
             what="the reload counted as failed")
    for line in lines:
        assert f"reload rejected, the running config stays: {m.config_path}: " in m.log()
        assert f"{m.config_path}: {line}" in m.log(), line
    assert "generation 2" not in m.log()
    assert http_get("127.0.0.1", ports["outbound"], "/", {"Host": "web"})[0] == 200


def test_provider_options_are_checked_by_check_run_and_reload(mesh, backends, tmp_path) -> None:
    folder = tmp_path / "identity"
    folder.mkdir()
    bad = (f'[identity]\nprovider = "files"\ncert_file = "{folder}/tls.crt"\n'
           f'ca_file = "{folder}/ca.crt"\npoll = 5\nkey_fiel = "x"\n')
    refused_everywhere(mesh, backends, tmp_path, bad, [
        "identity.key_file: required",
        "identity.poll: expected a duration string with a unit like \"10s\" or \"250ms\", got 5",
        "identity.key_fiel: unknown key (known: ca_file, cert_file, key_file, poll)",
    ])


def test_an_unknown_provider_is_refused_by_check_run_and_reload(mesh, backends, tmp_path) -> None:
    refused_everywhere(mesh, backends, tmp_path, '[identity]\nprovider = "fiels"\n', [
        "identity.provider: no identity plugin named 'fiels' is installed (installed: ",
    ])


def test_a_listener_certificate_that_does_not_load_is_refused(mesh, backends, tmp_path) -> None:
    authority = ca.new_ca(TD)
    one, other = leaf(authority), leaf(authority)
    (tmp_path / "web.crt").write_bytes(one.cert_pem)
    (tmp_path / "other.key").write_bytes(other.key_pem)
    # mesh.config's last [[listener]] is the outbound one (listener[0]).
    bad = (f'[listener.tls]\ncert_file = "{tmp_path}/web.crt"\n'
           f'key_file = "{tmp_path}/other.key"\n')
    refused_everywhere(mesh, backends, tmp_path, bad, [
        f"listener[0].tls.cert_file: cannot load the certificate {tmp_path}/web.crt with the "
        f"key {tmp_path}/other.key: key values mismatch",
    ])
    missing = f'[listener.tls]\ncert_file = "{tmp_path}/nope.crt"\nkey_file = "{tmp_path}/other.key"\n'
    path = tmp_path / "missing.toml"
    path.write_text(mesh.config({"web": ["127.0.0.1:1"]})[0] + "\n" + missing)
    out = subprocess.run([sys.executable, "-m", "meshd", "check", "-c", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert (f"{path}: listener[0].tls.cert_file: cannot read {tmp_path}/nope.crt: "
            "No such file or directory") in out.stderr


def test_a_config_with_other_problems_still_reports_the_providers(tmp_path, mesh) -> None:
    """Every problem at once: the provider is checked from the raw table too."""
    text = mesh.config({"web": ["127.0.0.1:1"]})[0]
    path = tmp_path / "two.toml"
    path.write_text("wokrers = 2\n" + text + '\n[identity]\nprovider = "files"\n')
    out = subprocess.run([sys.executable, "-m", "meshd", "check", "-c", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert f"{path}: wokrers: unknown key" in out.stderr
    for key in ("cert_file", "key_file", "ca_file"):
        assert f"{path}: identity.{key}: required" in out.stderr, out.stderr


def test_a_good_identity_config_passes_check(tmp_path, mesh) -> None:
    authority = ca.new_ca(TD)
    web = leaf(authority)
    folder = tmp_path / "identity"
    replace_files(folder, files(web.cert_pem, web.key_pem, authority.cert_pem))
    path = tmp_path / "good.toml"
    path.write_text(mesh.config({"web": ["127.0.0.1:1"]})[0] + "\n" + identity_toml(folder))
    out = subprocess.run([sys.executable, "-m", "meshd", "check", "-c", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out
