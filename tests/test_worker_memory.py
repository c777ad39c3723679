"""What a worker's memory is made of (docs/perf/memory.md): nearly all of it is code, the
master's (inherited at fork) and its own imports. These tests guard the cuts: a worker
of a plain HTTP config, and one with [identity] and an mTLS listener, map no
``cryptography`` (its Rust extension is about 10 MB of a worker's RSS); no meshd process
of a plain config maps ``yaml`` (only `meshd inject` needs it); and the master freezes
its objects across a fork, so a child's garbage collections leave its pages shared."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

from meshd.identity import ca, ca_dir
from meshd.master import spawn
from meshd.shm import KIND_WORKER, STATE_SERVING
from meshd.testing.harness import Meshd, free_port, http_get, wait_for

WEB = {"Host": "web"}
CRYPTOGRAPHY = "/cryptography/hazmat/bindings/_rust"   # the extension: cryptography imported
YAML = "/yaml/_yaml."                                   # libyaml's binding: yaml imported


TD = "cluster.local"
SELF = f"spiffe://{TD}/ns/default/sa/api"


def identity_table(folder: Path) -> str:
    """An [identity] table of the files provider: a new CA and this meshd's leaf."""
    authority = ca.new_ca(TD)
    leaf = ca.issue(authority, SELF)
    folder.mkdir(parents=True)
    for name, data in (("ca.crt", authority.cert_pem), ("tls.crt", leaf.cert_pem),
                       ("tls.key", leaf.key_pem)):
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return (f'\n[identity]\nprovider = "files"\ntrust_domain = "{TD}"\n'
            f'cert_file = "{folder}/tls.crt"\nkey_file = "{folder}/tls.key"\n'
            f'ca_file = "{folder}/ca.crt"\n')


def mapped_files(pid: int) -> set[str]:
    """The files mapped into ``pid`` (shared objects among them: the extension modules
    it imported)."""
    with open(f"/proc/{pid}/maps") as f:
        return {parts[5].strip() for line in f if len(parts := line.split(maxsplit=5)) == 6}


def maps(files: set[str], part: str) -> list[str]:
    return sorted(f for f in files if part in f)


def serving_worker(m: Meshd) -> int:
    pids: list[int] = wait_for(lambda: m.worker_pids(STATE_SERVING), timeout=20,
                               what="a serving worker")
    return pids[0]


def test_a_plain_http_worker_imports_neither_cryptography_nor_yaml(mesh, backends) -> None:
    a = backends("a")
    m = mesh.run({"web": [a.address]}, workers=1)
    # A request served end to end: the worker has imported what the request path needs.
    assert http_get("127.0.0.1", m.ports["outbound"], "/", WEB)[0] == 200
    worker = serving_worker(m)
    files = mapped_files(worker)
    assert any("/_ssl." in f for f in files), "gevent patches ssl: the worker maps _ssl"
    assert maps(files, CRYPTOGRAPHY) == [] and maps(files, YAML) == [], files
    assert maps(mapped_files(m.pid), YAML) == []


@pytest.mark.parametrize("provider", ["files", "meshd-ca"])
def test_an_mtls_worker_does_not_import_cryptography(
        mesh, backends, tmp_path: Path, provider: str) -> None:
    """[identity] and a strict mTLS inbound listener: the worker loads its leaf and reads
    its SPIFFE ID, serial and expiry without cryptography (the control process checks the
    material with it, once for all workers); the meshd-ca provider's module, which the
    worker imports to see that it never authorizes, does not import it either."""
    a = backends("a")
    port = free_port()
    listener = (f'\n[[listener]]\nname = "inbound"\nlisten = "127.0.0.1:{port}"\n'
                f'direction = "inbound"\nprotocol = "auto"\nforward = "{a.address}"\n'
                f'mtls = "strict"\n')
    if provider == "files":
        table, local_id = identity_table(tmp_path / "id"), SELF
    else:
        ca_dir.init(str(tmp_path / "ca"), TD)
        table = (f'\n[identity]\nprovider = "meshd-ca"\ntrust_domain = "{TD}"\n'
                 f'dir = "{tmp_path / "ca"}"\nservice = "web"\nttl = "1h"\n')
        local_id = f"spiffe://{TD}/service/web"
    text, ports = mesh.config({}, workers=1, listeners=listener, extra=table)
    m = mesh.start(text, ports)   # ready: every worker has loaded the identity
    worker = serving_worker(m)
    wait_for(lambda: "identity: worker" in m.log(), timeout=20, what="the worker's identity log")
    assert f"identity: worker {worker} loaded {local_id}" in m.log()
    assert maps(mapped_files(worker), CRYPTOGRAPHY) == []
    assert maps(mapped_files(m.control_pids()[0]), CRYPTOGRAPHY), "the control process checks it"


def test_the_master_forks_with_its_objects_frozen_and_unfreezes(monkeypatch) -> None:
    """In the child, objects are frozen at fork (its collections never examine, so never
    copy, the master's pages); the master's own collections are unchanged after it."""
    seen: list[int] = []

    def fork() -> int:
        seen.append(gc.get_freeze_count())
        return 2 ** 22 + 1   # the parent's side: a child's pid

    monkeypatch.setattr(os, "fork", fork)
    assert gc.get_freeze_count() == 0
    pid = spawn.fork_child(None, KIND_WORKER, [])  # type: ignore[arg-type]
    assert pid == 2 ** 22 + 1 and seen and seen[0] > 1000, seen
    assert gc.get_freeze_count() == 0

    def failing_fork() -> int:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", failing_fork)
    with pytest.raises(OSError):
        spawn.fork_child(None, KIND_WORKER, [])  # type: ignore[arg-type]
    assert gc.get_freeze_count() == 0


def test_the_workers_leaf_decoding_agrees_with_cryptography(tmp_path: Path) -> None:
    """The SPIFFE ID, serial and expiry a worker reads with the standard library are those
    cryptography reads (the fallback), for leaves with random serials, and "" for a
    certificate without a single SPIFFE URI SAN (the CA's)."""
    from meshd.worker.identity import _leaf, _leaf_cryptography

    authority = ca.new_ca(TD)
    cases = [(ca.issue(authority, f"{SELF}-{i}"), f"{SELF}-{i}") for i in range(8)]
    cases.append((authority, ""))
    for n, (cert, spiffe_id) in enumerate(cases):
        pem = cert.cert_pem + authority.cert_pem + cert.key_pem   # leaf, chain, key
        path = tmp_path / f"{n}.pem"
        path.write_bytes(pem)
        got = _leaf(str(path), pem)
        assert got == _leaf_cryptography(pem), n
        assert got[0] == spiffe_id and got[1] == got[1].lower() and not got[1].startswith("0")
    # What is not a certificate fails as _load expects (OSError, ValueError: logged, the
    # last good material kept), never with another exception out of a handshake's refresh.
    for n, junk in enumerate((b"", b"not a certificate\n", authority.key_pem,
                              b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")):
        path = tmp_path / f"junk-{n}.pem"
        path.write_bytes(junk)
        with pytest.raises((OSError, ValueError)):
            _leaf(str(path), junk)
