"""A real meshd with ``[identity] provider = "files"``: the control process publishes the
checked material (0600 files in the private 0700 shm_dir), workers load it before they
serve and again on every rotation (plain files replaced, or a Kubernetes Secret volume's
..data swap), a bad certificate is refused with a log line while the last good stays,
the files go when meshd stops, and no key byte ever reaches the log."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
from cryptography import x509

from meshd.identity import ca
from meshd.identity import paths as identity_paths
from meshd.shm import KIND_WORKER, STATE_SERVING
from meshd.testing.harness import Meshd, http_get, wait_for
from meshd.testing.identity_files import (
    TD,
    WEB,
    expired,
    files,
    handshake,
    identity_toml,
    key_lines,
    leaf,
    replace_files,
    secret_volume,
)
from meshd.worker.identity import WorkerIdentity


def admin_json(m: Meshd, path: str) -> dict:
    host, _, port = (m.admin or "").rpartition(":")
    status, _, body = http_get(host, int(port), path)
    assert status == 200, (status, body)
    return json.loads(body)


def published_paths(m: Meshd, shm_dir: Path):
    text = m.config_path.read_text()
    instance = re.search(r'instance = "([^"]+)"', text)[1]  # type: ignore[index]
    return identity_paths(str(shm_dir), instance, m.pid)


def assert_no_key_logged(m: Meshd, *keys: ca.Issued) -> None:
    text = m.log()
    assert "PRIVATE KEY" not in text
    for issued in keys:
        for line in key_lines(issued.key_pem):
            assert line not in text


@pytest.fixture(scope="module")
def authority() -> ca.Issued:
    return ca.new_ca(TD)


def start(mesh, backends, folder: Path, **kwargs):
    a = backends("a")
    return mesh.run({"web": [a.address]}, workers=2, extra=identity_toml(folder), **kwargs)


def test_a_meshd_publishes_its_files_identity_and_workers_load_it(
        mesh, backends, authority: ca.Issued, tmp_path: Path) -> None:
    folder = tmp_path / "identity"
    first = leaf(authority)
    replace_files(folder, files(first.cert_pem, first.key_pem, authority.cert_pem))
    m = start(mesh, backends, folder)
    info = admin_json(m, "/identity")
    serial = f"{x509_serial(first):x}"
    assert info["local_id"] == WEB and info["serial"] == serial and info["provider"] == "files"
    assert info["roots"] == [f"CN=meshd root {TD},O=meshd"] and info["last_error"] is None
    assert m.metric("meshd_identity_published_total") == 1
    assert m.metric("meshd_identity_cert_expiration_timestamp_seconds",
                    f'identity="{WEB}"') == pytest.approx(x509_not_after(first), abs=1)
    log = m.log()
    assert re.search(rf"identity: published {WEB} \(expires \S+, serial {serial}; provider files "
                     r"\(meshd-proxy ", log), log
    # Both workers loaded it before they served (a worker serves only with an identity).
    for pid in m.worker_pids():
        loaded = log.index(f"identity: worker {pid} loaded {WEB} (serial {serial}")
        assert loaded < log.index(f"worker {pid} (g1, slot")
    # The published files: 0600, meshd's own, in the 0700 shm_dir; the pem holds chain + key.
    p = published_paths(m, mesh.shm_dir)
    for path in (p.pem, p.roots):
        st = os.stat(path, follow_symlinks=False)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.geteuid()
    assert stat.S_IMODE(os.stat(mesh.shm_dir).st_mode) == 0o700
    assert Path(p.pem).read_bytes() == first.cert_pem + first.key_pem
    assert Path(p.roots).read_bytes() == authority.cert_pem
    assert http_get("127.0.0.1", m.ports["outbound"], "/", {"Host": "web"})[0] == 200
    assert_no_key_logged(m, first)
    m.stop()
    assert not os.path.exists(p.pem) and not os.path.exists(p.roots)


def x509_serial(issued: ca.Issued) -> int:
    return x509.load_pem_x509_certificate(issued.cert_pem).serial_number


def x509_not_after(issued: ca.Issued) -> float:
    return x509.load_pem_x509_certificate(issued.cert_pem).not_valid_after_utc.timestamp()


@pytest.mark.parametrize("layout", [replace_files, secret_volume], ids=["rename", "secret-volume"])
def test_rotation_reaches_every_worker_and_bad_material_is_refused(
        mesh, backends, authority: ca.Issued, tmp_path: Path, layout) -> None:
    folder = tmp_path / "identity"
    first = leaf(authority)
    layout(folder, files(first.cert_pem, first.key_pem, authority.cert_pem))
    m = start(mesh, backends, folder)
    workers = m.worker_pids()
    assert len(workers) == 2

    def loaded_by_all(issued: ca.Issued) -> bool:
        serial = f"{x509_serial(issued):x}"
        return all(f"identity: worker {pid} loaded {WEB} (serial {serial}" in m.log()
                   for pid in workers)

    # Rotation: the new leaf is published and every worker loads it.
    second = leaf(authority)
    layout(folder, files(second.cert_pem, second.key_pem, authority.cert_pem))
    wait_for(lambda: admin_json(m, "/identity")["serial"] == f"{x509_serial(second):x}",
             what="the rotated leaf published")
    wait_for(lambda: loaded_by_all(second), what="every worker loaded the rotated leaf")
    assert m.metric("meshd_identity_cert_expiration_timestamp_seconds",
                    f'identity="{WEB}"') == pytest.approx(x509_not_after(second), abs=1)
    good_serial = f"{x509_serial(second):x}"

    # Bad material: each refused with its reason; the last good stays published.
    foreign = ca.new_ca("other.local")
    wrong_td = leaf(foreign, "spiffe://other.local/ns/default/sa/web")
    mismatched = leaf(authority)
    stale = expired(authority)
    bad = [
        (files(stale.cert_pem, stale.key_pem, authority.cert_pem), "expired at"),
        (files(wrong_td.cert_pem, wrong_td.key_pem, foreign.cert_pem),
         "is not in the trust domain 'cluster.local'"),
        (files(mismatched.cert_pem, second.key_pem, authority.cert_pem),
         "the key does not match the leaf certificate"),
    ]
    for contents, reason in bad:
        line = re.compile(r"ERROR meshd\[\d+\] meshd.control: identity: refused material from "
                          rf"provider files \(meshd-proxy [^)]*\): [^\n]*{reason}[^\n]*; keeping "
                          rf"{WEB} \(expires ")
        seen = len(line.findall(m.log()))
        refused = m.metric("meshd_identity_refused_total")
        layout(folder, contents)
        wait_for(lambda line=line, seen=seen: len(line.findall(m.log())) > seen,
                 what=f"the refusal ({reason}) logged")
        assert m.metric("meshd_identity_refused_total") > refused
        info = admin_json(m, "/identity")
        assert info["serial"] == good_serial and reason in info["last_error"]
    p = published_paths(m, mesh.shm_dir)
    assert Path(p.pem).read_bytes() == second.cert_pem + second.key_pem
    assert m.metric("meshd_identity_published_total") == 2
    # Good again: published, and loaded by every worker.
    third = leaf(authority)
    layout(folder, files(third.cert_pem, third.key_pem, authority.cert_pem))
    wait_for(lambda: loaded_by_all(third), what="every worker loaded the leaf after the bad ones")
    assert admin_json(m, "/identity")["last_error"] is None
    # What the workers loaded, as a worker loads it: a TLS server and client from the
    # published files shake hands, presenting the third leaf.
    ident = WorkerIdentity(p, TD)
    ident.refresh()
    server, client = handshake(ident.server_context("strict"), ident.client_context())
    assert WorkerIdentity.peer_id(client) == WEB == WorkerIdentity.peer_id(server)
    presented = x509.load_der_x509_certificate(client.getpeercert(binary_form=True))
    assert presented.serial_number == x509_serial(third)
    server.close()
    client.close()
    assert_no_key_logged(m, first, second, wrong_td, mismatched, stale, third)


def test_workers_wait_for_an_identity_before_they_serve(
        mesh, backends, authority: ca.Issued, tmp_path: Path) -> None:
    folder = tmp_path / "identity"
    folder.mkdir()   # the files are not there yet (a SPIRE helper fetching its first SVID)
    m = start(mesh, backends, folder, wait_ready=False)
    host, _, port = (m.admin or "").rpartition(":")

    def ready_answer() -> bytes:
        try:
            return http_get(host, int(port), "/ready", timeout=2)[2]
        except OSError:
            return b""
    wait_for(lambda: b"identity: no material published by provider files" in ready_answer(),
             what="/ready saying it waits for an identity")
    assert b"tls.crt: No such file or directory" in ready_answer()
    # The workers have the snapshot but no identity: none serves yet.
    assert [s for s in m.slots(KIND_WORKER) if s.state == STATE_SERVING] == []
    first = leaf(authority)
    secret_volume(folder, files(first.cert_pem, first.key_pem, authority.cert_pem))
    m.wait_ready()
    assert admin_json(m, "/identity")["local_id"] == WEB
    assert http_get("127.0.0.1", m.ports["outbound"], "/", {"Host": "web"})[0] == 200


def test_a_leaf_not_valid_yet_is_published_once_it_is(
        mesh, backends, authority: ca.Issued, tmp_path: Path) -> None:
    """A leaf from an issuer whose clock is ahead of ours is refused, and offered again
    when it becomes valid: the files provider yields on change only, and nothing changes."""
    import datetime
    folder = tmp_path / "identity"
    first = leaf(authority)
    secret_volume(folder, files(first.cert_pem, first.key_pem, authority.cert_pem))
    m = start(mesh, backends, folder)
    ahead = ca.issue(authority, WEB, not_before=datetime.datetime.now(datetime.UTC)
                     + datetime.timedelta(seconds=3))
    secret_volume(folder, files(ahead.cert_pem, ahead.key_pem, authority.cert_pem))
    wait_for(lambda: re.search(r"identity: refused material from provider files [^\n]* is not "
                               r"valid before [^\n]*; offered again in \d+\.\ds", m.log()),
             what="the early leaf refused, with a retry")
    serial = f"{x509_serial(ahead):x}"
    wait_for(lambda: admin_json(m, "/identity")["serial"] == serial, timeout=30,
             what="the leaf published once valid")
    assert f"identity: published {WEB} (expires" in m.log()
