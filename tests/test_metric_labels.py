"""The tls, client_id and server_id labels of the request metrics (meshd.rowkeys): the
row keys, their rendering, and a real meshd with [identity] counting an mTLS client
under its own identity (rows assigned by the control process when a worker first sees
it; the bound per listener), plaintext under tls="false", and outbound requests under the
identity their endpoints share (tls="mixed" when they differ)."""

from __future__ import annotations

import socket

from conftest import MeshFactory
from test_authz import AUTHORITY, SELF, TD, WEB, client_cert, curl_mtls, identity_table, inbound

from meshd import rowkeys
from meshd.config import parse
from meshd.discovery.api import Endpoint
from meshd.metrics import RowKey, row_keys
from meshd.snapshot import control_socket_path, snapshot_path
from meshd.snapshot import read as read_snapshot
from meshd.testing.harness import free_port, http_get, wait_for

assert AUTHORITY  # the module's CA: meshd's identity and the clients' certificates


def test_keys_roundtrip_and_plaintext_keys_are_the_service() -> None:
    assert rowkeys.key("web", False) == "web"
    assert rowkeys.split("web") == ("web", "false", "")
    for tls, peer in ((True, WEB), (True, ""), (True, rowkeys.OTHER), ("mixed", "")):
        k = rowkeys.key("web", tls, peer)
        assert rowkeys.split(k) == ("web", "true" if tls is True else tls, peer)


def test_outbound_key_follows_the_endpoints_identity() -> None:
    meshed = Endpoint("10.0.0.1", 80, meshed=True, inbound_port=4143, identity=WEB)
    plain = Endpoint("10.0.0.2", 80)
    no_id = Endpoint("10.0.0.3", 80, meshed=True, inbound_port=4143)
    assert rowkeys.outbound_key(True, "web", (meshed, meshed)) == rowkeys.key("web", True, WEB)
    assert rowkeys.outbound_key(True, "web", (plain, no_id)) == "web"
    assert rowkeys.outbound_key(True, "web", (meshed, plain)) == rowkeys.key("web", "mixed")
    assert rowkeys.outbound_key(False, "web", (meshed,)) == "web"  # no [identity]: no mTLS


def test_row_keys_label_only_with_identity() -> None:
    import tomllib
    text = ('[[listener]]\nname = "in"\nlisten = "127.0.0.1:1"\ndirection = "inbound"\n'
            'forward = "127.0.0.1:2"\n[[listener]]\nname = "out"\nlisten = "127.0.0.1:3"\n')
    rows = {"in": {"127.0.0.1:2": 2, rowkeys.key("127.0.0.1:2", True, WEB): 3},
            "out": {"web": 4, rowkeys.key("web", True, SELF): 5}}
    plain = row_keys(parse(tomllib.loads(text)), rows)
    assert plain[3] == RowKey("inbound", "in", "127.0.0.1:2", "", WEB)
    withid = row_keys(parse(tomllib.loads('[identity]\nprovider = "files"\n' + text)), rows)
    assert withid[2] == RowKey("inbound", "in", "127.0.0.1:2", "false", "")
    assert withid[3] == RowKey("inbound", "in", "127.0.0.1:2", "true", WEB)
    assert withid[5] == RowKey("outbound", "out", "web", "true", SELF)


def test_inbound_rows_by_client_identity(mesh: MeshFactory, backends, tmp_path) -> None:
    b = backends("app")
    port = free_port()
    text, ports = mesh.config({}, workers=1, listeners=inbound("inbound", port, b.address),
                              extra=identity_table(tmp_path / "id"))
    m = mesh.start(text, ports)
    base = f'direction="inbound",listener="inbound",service="{b.address}"'
    web = client_cert(tmp_path / "peers", WEB)
    # the first requests of a new identity count under "other" until its row is published
    sent = 0

    def counted_as_web() -> bool:
        nonlocal sent
        assert curl_mtls(port, "/x", web, "--http1.1")[0] == "200 1.1"
        sent += 1
        return m.metric("request_total", f'{base},tls="true",client_id="{WEB}"') >= 1
    wait_for(counted_as_web, 20, what="a row of its own for the client identity")
    assert sent <= 50
    other = m.metric("request_total", f'{base},tls="true",client_id="other"')
    assert other + m.metric("request_total", f'{base},tls="true",client_id="{WEB}"') == sent
    assert m.metric("response_total", f'{base},tls="true",client_id="{WEB}",status_code="200"') >= 1
    # plaintext on the permissive listener
    assert http_get("127.0.0.1", port, "/plain", {"Host": "app"})[0] == 200
    assert m.metric("request_total", f'{base},tls="false",client_id="",') == 1

    # the bound: a worker asking for more identities than MAX_CLIENT_IDS (here the test
    # plays the worker on the control socket) gets rows for the first ones only
    shm_dir = str(mesh.shm_dir)
    instance = text.split('instance = "', 1)[1].split('"', 1)[0]
    path = control_socket_path(shm_dir, instance, m.pid, 1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        for i in range(rowkeys.MAX_CLIENT_IDS + 20):
            s.sendto(rowkeys.ROW_REQUEST + b"inbound\0" + f"spiffe://{TD}/sa/c{i}".encode(),
                     path)
        s.sendto(rowkeys.ROW_REQUEST + b"inbound\0not a spiffe id", path)
        s.sendto(rowkeys.ROW_REQUEST + b"outbound\0" + WEB.encode(), path)

    snapshot_file = snapshot_path(shm_dir, instance, m.pid, 1)

    def rows() -> dict[str, dict[str, int]]:
        return read_snapshot(snapshot_file).rows  # type: ignore[return-value]

    def client_rows() -> int:
        return sum(1 for k in rows().get("inbound", {})  # an authority's rows aside
                   if rowkeys.split(k)[2] not in ("", rowkeys.OTHER)
                   and not rowkeys.parts(k).authority)
    wait_for(lambda: client_rows() == rowkeys.MAX_CLIENT_IDS, 20,
             what="client rows up to the bound")
    assert 'more count under client_id="other"' in m.log()
    assert rowkeys.key(b.address, True, WEB) in rows()["inbound"]
    assert not any(rowkeys.SEP in k for k in rows().get("outbound", {}))


def test_outbound_rows_by_server_identity(mesh: MeshFactory, backends, tmp_path) -> None:
    b = backends("app")
    port = free_port()
    meshed = f'{{ address = "{b.address}", meshed = true, inbound_port = {port}, identity = "{SELF}" }}'
    plain = f'{{ address = "{b.address}" }}'
    text, ports = mesh.config({}, workers=1, listeners=inbound("inbound", port, b.address),
                              extra=identity_table(tmp_path / "id"))
    text = text.replace("[discovery.services]\n",
                        f"[discovery.services]\nmeshed = [{meshed}]\nplain = [{plain}]\n"
                        f"both = [{meshed}, {plain}]\n")
    m = mesh.start(text, ports)
    out = ports["outbound"]
    for host in ("meshed", "plain", "both", "both"):
        status, _, body = http_get("127.0.0.1", out, "/o", {"Host": host})
        assert status == 200, body
    base = 'direction="outbound",listener="outbound"'
    assert m.metric("request_total", f'{base},service="meshed",tls="true",server_id="{SELF}"') == 1
    assert m.metric("request_total", f'{base},service="plain",tls="false",server_id=""') == 1
    assert m.metric("request_total", f'{base},service="both",tls="mixed",server_id=""') == 2
    # the meshed hop went over mTLS (this meshd to its own inbound listener): the inbound
    # side counts it as TLS from this meshd's own identity (or "other" until its row exists)
    inbound_base = f'direction="inbound",listener="inbound",service="{b.address}"'
    through = m.metric("request_total", f'{inbound_base},tls="true"')
    assert through >= 1
    assert through == (m.metric("request_total", f'{inbound_base},tls="true",client_id="{SELF}"')
                       + m.metric("request_total", f'{inbound_base},tls="true",client_id="other"'))
    assert m.metric("request_total", f'{inbound_base},tls="false"') == 0
