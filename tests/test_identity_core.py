"""Identity in-process: the provider registry, the check every Material passes
(meshd.identity.material), the files provider's watch (plain files and a Kubernetes
Secret volume's ..data swap), and WorkerIdentity's contexts over real TLS handshakes on
loopback socket pairs (gevent, as in a worker)."""

from __future__ import annotations

import datetime
import json
import os
import queue
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import gevent
import gevent.socket
import gevent.ssl
import pytest

from meshd.errors import ConfigError, PluginError
from meshd.identity import ca, paths
from meshd.identity.api import Material, Settings
from meshd.identity.files import FilesProvider
from meshd.identity.material import MaterialError, check
from meshd.identity.registry import available, load
from meshd.private_files import write_atomic
from meshd.testing.identity_files import (
    TD,
    WEB,
    expired,
    files,
    handshake,
    leaf,
    replace_files,
    secret_volume,
)
from meshd.worker.identity import IdentityNotReady, WorkerIdentity

SETTINGS = Settings(trust_domain=TD, instance="t", state_dir="/nonexistent")


@pytest.fixture(scope="module")
def authority() -> ca.Issued:
    return ca.new_ca(TD)


def material(authority: ca.Issued, issued: ca.Issued, roots: bytes | None = None) -> Material:
    return Material(issued.cert_pem, issued.key_pem, roots or authority.cert_pem)


# -- registry ------------------------------------------------------------------------------

def test_the_files_provider_is_registered_under_meshd_identity() -> None:
    plugins, refused = available()
    assert plugins["files"].distribution == "meshd-proxy" and "files" not in refused
    cls, info = load("files")
    assert cls is FilesProvider and info.value == "meshd.identity.files:FilesProvider"
    with pytest.raises(PluginError, match=r"no identity plugin named 'nope' is installed "
                                          r"\(installed: .*files"):
        load("nope")


# -- material.check ------------------------------------------------------------------------

def test_a_good_material_gives_its_spiffe_id_and_expiry(authority: ca.Issued) -> None:
    issued = leaf(authority, ttl=3600)
    got = check(material(authority, issued), TD)
    assert got.spiffe_id == WEB and got.trust_domain == TD
    now = datetime.datetime.now(datetime.UTC).timestamp()
    assert now + 3500 < got.not_after < now + 3700
    assert got.roots == (f"CN=meshd root {TD},O=meshd",)


def test_material_refusals(authority: ca.Issued) -> None:
    good = leaf(authority)
    other = leaf(authority)
    stranger = ca.new_ca(TD)
    foreign = ca.new_ca("other.local")
    cases = {
        "the key does not match the leaf certificate":
            Material(good.cert_pem, other.key_pem, authority.cert_pem),
        "expired at": material(authority, expired(authority)),
        "is not valid before": material(authority, ca.issue(
            authority, WEB, not_before=datetime.datetime.now(datetime.UTC)
            + datetime.timedelta(hours=1))),
        "is not in the trust domain 'cluster.local'":
            material(foreign, leaf(foreign, "spiffe://other.local/ns/default/sa/web")),
        "the chain does not lead to any of the roots (roots: CN=meshd root cluster.local":
            Material(good.cert_pem, good.key_pem, stranger.cert_pem),
        "the certificate chain: no PEM certificate":
            Material(b"garbage", good.key_pem, authority.cert_pem),
        "the roots: no PEM certificate": Material(good.cert_pem, good.key_pem, b""),
        "the key does not load": Material(good.cert_pem, b"-----BEGIN PRIVATE KEY-----\nAAAA\n"
                                                         b"-----END PRIVATE KEY-----\n",
                                          authority.cert_pem),
        "the leaf certificate is a CA certificate": Material(authority.cert_pem,
                                                             authority.key_pem,
                                                             authority.cert_pem),
        "the leaf's URI SAN: 'spiffe://cluster.local' has no path":
            material(authority, leaf(authority, "spiffe://cluster.local")),
    }
    for reason, m in cases.items():
        with pytest.raises(MaterialError) as info:
            check(m, TD)
        assert reason in str(info.value), (reason, str(info.value))
        assert "PRIVATE KEY" not in str(info.value)
    # The provider's trust domain (Consul names its own) wins over [identity]'s.
    m = material(foreign, leaf(foreign, "spiffe://other.local/ns/default/sa/web"))
    assert check(Material(m.chain_pem, m.key_pem, m.roots_pem, "other.local"), TD).spiffe_id


def test_a_material_never_shows_its_key(authority: ca.Issued) -> None:
    issued = leaf(authority)
    shown = repr(material(authority, issued))
    assert "key=<hidden>" in shown and issued.key_pem.decode().splitlines()[1] not in shown


# -- the files provider ----------------------------------------------------------------------

def test_files_options_are_checked_with_key_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        FilesProvider({"cert_file": str(tmp_path / "a"), "poll": "often", "pol": 1}, SETTINGS)
    assert dict(info.value.problems) == {
        "key_file": "required",
        "ca_file": "required",
        "poll": "expected a duration with a unit (ms, s, m, h) like \"10s\", got 'often'",
        "pol": "unknown key (known: ca_file, cert_file, key_file, poll)",
    }
    with pytest.raises(ConfigError) as info:
        FilesProvider({"cert_file": "/nonexistent-dir/tls.crt", "key_file": 7,
                       "ca_file": str(tmp_path / "ca.crt")}, SETTINGS)
    assert dict(info.value.problems) == {
        "cert_file": "the directory /nonexistent-dir of /nonexistent-dir/tls.crt does not exist",
        "key_file": "expected a file path, got 7",
    }


def _watching(provider: FilesProvider) -> tuple[queue.Queue[Material], threading.Event]:
    """The provider's watch() in a thread; what it yields, in a queue."""
    out: queue.Queue[Material] = queue.Queue()
    stop = threading.Event()

    def run() -> None:
        for m in provider.watch():
            out.put(m)
            if stop.is_set():
                return
    threading.Thread(target=run, daemon=True).start()
    return out, stop


def _provider(folder: Path) -> FilesProvider:
    return FilesProvider({"cert_file": str(folder / "tls.crt"), "key_file": str(folder / "tls.key"),
                          "ca_file": str(folder / "ca.crt"), "poll": "50ms"}, SETTINGS)


@pytest.mark.parametrize("layout", [replace_files, secret_volume], ids=["rename", "secret-volume"])
def test_files_watch_yields_at_start_and_on_every_change(authority: ca.Issued, tmp_path: Path,
                                                        layout) -> None:
    folder = tmp_path / "identity"
    folder.mkdir()
    provider = _provider(folder)
    out, stop = _watching(provider)
    # Nothing there yet: watch() waits (and says why), then yields once the files appear.
    first = leaf(authority)
    layout(folder, files(first.cert_pem, first.key_pem, authority.cert_pem))
    got = out.get(timeout=10)
    assert got.chain_pem == first.cert_pem and check(got, TD).spiffe_id == WEB
    second = leaf(authority)
    layout(folder, files(second.cert_pem, second.key_pem, authority.cert_pem))
    # A rename-by-rename writer can be seen half-way (new cert, old key): check() refuses
    # that one and a later yield has the whole rotation.
    for _ in range(5):
        got = out.get(timeout=10)
        if got.key_pem == second.key_pem and got.chain_pem == second.cert_pem:
            break
        with pytest.raises(MaterialError, match="does not match"):
            check(got, TD)
    assert got.chain_pem == second.cert_pem and got.key_pem == second.key_pem
    # Only the roots change (a CA rotation's bundle): yielded too.
    stop.set()
    bundle = authority.cert_pem + ca.new_ca(TD).cert_pem
    layout(folder, files(second.cert_pem, second.key_pem, bundle))
    assert out.get(timeout=10).roots_pem == bundle


def test_files_watch_reports_why_it_waits(tmp_path: Path) -> None:
    provider = _provider(tmp_path)
    assert provider.read() is None
    assert provider.error == f"cert_file {tmp_path}/tls.crt: No such file or directory"


# -- WorkerIdentity ------------------------------------------------------------------------------

@pytest.fixture
def published(tmp_path: Path) -> Iterator[tuple[Path, WorkerIdentity]]:
    shm = tmp_path / "shm"
    shm.mkdir(mode=0o700)
    p = paths(str(shm), "t", 1)
    yield shm, WorkerIdentity(p, TD)


def publish(ident: WorkerIdentity, issued: ca.Issued, roots: bytes) -> None:
    """As the control process does: roots, then chain and key, each by rename."""
    write_atomic(ident.paths.roots, roots)
    write_atomic(ident.paths.pem, issued.cert_pem + issued.key_pem)


def test_worker_identity_loads_the_published_files_and_handshakes(
        authority: ca.Issued, published: tuple[Path, WorkerIdentity]) -> None:
    _, ident = published
    ident.refresh()
    assert not ident.ready() and ident.local_id == ""
    with pytest.raises(IdentityNotReady):
        ident.client_context()
    web = leaf(authority)
    publish(ident, web, authority.cert_pem)
    ident.refresh()
    assert ident.ready() and ident.local_id == WEB
    # A peer meshd with its own leaf of the same CA: mutual TLS both ways.
    peer = WorkerIdentity(ident.paths, TD)
    peer.refresh()
    server, client = handshake(ident.server_context("strict"), peer.client_context())
    assert isinstance(server, gevent.ssl.SSLSocket) and isinstance(client, gevent.ssl.SSLSocket), (server, client)
    assert client.version() == "TLSv1.3" and client.selected_alpn_protocol() == "h2"
    assert WorkerIdentity.peer_id(server) == WEB and WorkerIdentity.peer_id(client) == WEB
    # No client certificate: strict refuses the handshake, permissive lets it through
    # with no client identity.
    server, client = handshake(ident.server_context("strict"), None)
    assert isinstance(server, ssl.SSLError) or isinstance(client, ssl.SSLError) or (
        isinstance(client, gevent.ssl.SSLSocket) and client.recv(1) == b"")
    server, client = handshake(ident.server_context("permissive"), None)
    assert isinstance(server, gevent.ssl.SSLSocket), server
    assert WorkerIdentity.peer_id(server) == ""
    with pytest.raises(ValueError, match="mode must be one of"):
        ident.server_context("off")


def test_worker_identity_reloads_on_change_and_keeps_established_connections(
        authority: ca.Issued, published: tuple[Path, WorkerIdentity]) -> None:
    _, ident = published
    first = leaf(authority)
    publish(ident, first, authority.cert_pem)
    ident.refresh()
    serial = ident.serial
    server, client = handshake(ident.server_context("strict"), ident.client_context())
    assert isinstance(server, gevent.ssl.SSLSocket) and isinstance(client, gevent.ssl.SSLSocket)
    other = f"spiffe://{TD}/ns/default/sa/api"
    second = leaf(authority, other)
    publish(ident, second, authority.cert_pem)
    ident.refresh()   # one stat: the next handshake already uses the new material
    assert ident.local_id == other and ident.serial != serial and ident.loads == 2
    # The established connection goes on with its context; a new one presents the new leaf.
    client.sendall(b"ping")
    assert server.recv(4) == b"ping"
    new_server, new_client = handshake(ident.server_context("strict"), ident.client_context())
    assert WorkerIdentity.peer_id(new_client) == other


def test_worker_identity_refuses_files_another_user_could_write(
        authority: ca.Issued, published: tuple[Path, WorkerIdentity]) -> None:
    _, ident = published
    publish(ident, leaf(authority), authority.cert_pem)
    os.chmod(ident.paths.pem, 0o666)
    ident.refresh()
    assert not ident.ready()
    assert ident.error is not None and "writable by other users (mode 0666)" in ident.error
    # The file that failed is not read again on every handshake, only once a second.
    ident.error = "marker"
    ident.refresh()
    assert ident.error == "marker"
    ident._retry_at = 0.0
    ident.refresh()
    assert ident.error is not None and "mode 0666" in ident.error


def test_worker_identity_a_client_of_another_ca_is_refused(
        authority: ca.Issued, published: tuple[Path, WorkerIdentity], tmp_path: Path) -> None:
    _, ident = published
    publish(ident, leaf(authority), authority.cert_pem)
    ident.refresh()
    stranger_ca = ca.new_ca(TD)
    (tmp_path / "s").mkdir(mode=0o700)
    stranger = WorkerIdentity(paths(str(tmp_path / "s"), "t", 1), TD)
    publish(stranger, leaf(stranger_ca), stranger_ca.cert_pem)
    stranger.refresh()
    # The stranger does not trust our CA either: its client refuses our server's chain.
    server, client = handshake(ident.server_context("permissive"), stranger.client_context())
    assert isinstance(client, ssl.SSLCertVerificationError), client
    assert "certificate verify failed" in str(client)


# -- the control process's runner ------------------------------------------------------------

def test_the_runner_publishes_good_material_and_refuses_the_rest(
        authority: ca.Issued, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    from meshd.config_identity import IdentityConfig
    from meshd.control.identity import IdentityRunner
    shm = tmp_path / "shm"
    shm.mkdir(mode=0o700)
    cfg = SimpleNamespace(identity=IdentityConfig("files", TD, {}), instance="t",
                          state_dir=str(tmp_path))
    runner = IdentityRunner(cfg, paths(str(shm), "t", 1))  # type: ignore[arg-type]
    good = leaf(authority)
    assert runner.offer(material(authority, good))
    assert Path(runner.paths.pem).read_bytes() == good.cert_pem + good.key_pem
    stamp = os.stat(runner.paths.pem).st_ino
    odd = Material(good.cert_pem.decode(), good.key_pem, authority.cert_pem)  # type: ignore[arg-type]
    assert not runner.offer(odd)
    assert not runner.offer("not a material")  # type: ignore[arg-type]
    assert not runner.offer(Material(good.cert_pem, leaf(authority).key_pem, authority.cert_pem))
    assert runner.refused_total == 3 and runner.published_total == 1
    assert "the key does not match" in (runner.error or "")
    # The same material again: not rewritten (workers would reload it for nothing).
    assert runner.offer(material(authority, good))
    assert os.stat(runner.paths.pem).st_ino == stamp and runner.published_total == 1
    text = caplog.text
    assert "refused: cannot check it: TypeError" in text and "not a Material" in text
    assert "PRIVATE KEY" not in text
    info = runner.describe()
    assert info["local_id"] == WEB and info["last_error"] is None
    assert "PRIVATE KEY" not in json.dumps(info)
