"""A request's body bytes, counted once by the client side that relays it
(meshd.worker.observe), in the access log (``bytes_received``, ``bytes_sent``) and on
its span (``http.request.body.size``, ``http.response.body.size``, decoded by the suite's
OTLP receiver): real clients (curl over HTTP/1.1 with Content-Length and chunked, curl
and a raw h2 client with padded DATA over HTTP/2), a download framed chunked or by
length, a request retried on another endpoint (its body counted as the client sent it,
once), meshd's own error answers, HEAD."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from conftest import MeshFactory

from meshd.testing.harness import Backend, Meshd, read_head, wait_for
from meshd.testing.otlp_receiver import OtlpReceiver
from meshd.testing.tcp_server import TcpServer, echo


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        yield rx


@pytest.fixture(scope="module")
def backends() -> Iterator[tuple[Backend, Backend]]:
    """a answers; c answers every request 503 (after reading its body)."""
    a, c = Backend("a").start(), Backend("c").start()
    with socket.create_connection((c.host, c.port), timeout=10) as s:
        s.sendall(b"GET /_fail?code=503 HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n")
        while s.recv(4096):
            pass
    yield a, c
    a.stop()
    c.stop()


@pytest.fixture(scope="module")
def echo_server() -> Iterator[TcpServer]:
    with TcpServer(echo) as srv:
        yield srv


@pytest.fixture(scope="module")
def meshd(tmp_path_factory, receiver, backends, echo_server) -> Iterator[tuple[Meshd, Path]]:
    """web = [a]; flaky = [a, c], hashed on x-key (a key's first pick is fixed, and a
    retry goes to the other endpoint); echo, a TCP echo for CONNECT; a JSON access log;
    every request traced."""
    a, c = backends
    tmp = tmp_path_factory.mktemp("bytes")
    factory = MeshFactory(tmp)
    log = tmp / "access.log"
    text, ports = factory.config(
        {"web": [a.address], "flaky": [a.address, c.address], "echo": [echo_server.address]},
        workers=1,
        extra=(f'[access_log]\npath = "{log}"\nformat = "json"\n'
               f'[tracing]\notlp_endpoint = "{receiver.endpoint}"\nsample_rate = 1\n'
               '[service.flaky]\nbalancer = "consistent_hash"\nhash_on = "header:x-key"\n'
               'retries = 1\n'))
    m = factory.start(text, ports)
    yield m, log
    m.stop()


def _entry(log: Path, trace: str) -> dict[str, Any]:
    """The access log line of the request with this trace id."""
    found: list[dict[str, Any]] = []

    def seen() -> bool:
        if log.exists():
            found[:] = [e for e in map(json.loads, log.read_text().splitlines())
                        if e["trace_id"] == trace]
        return bool(found)
    assert wait_for(seen, timeout=20), log.read_text() if log.exists() else "no log"
    assert len(found) == 1, found
    return found[0]


def _counted(m: tuple[Meshd, Path], receiver: OtlpReceiver, trace: str
             ) -> tuple[dict[str, Any], tuple[int, int], tuple[int, int]]:
    """(the log line, its byte fields, its span's body sizes) of one request."""
    line = _entry(m[1], trace)
    (span,) = receiver.wait_spans(1, match=lambda s: s["trace_id"] == trace)
    attrs = span["attributes"]
    return (line, (line["bytes_received"], line["bytes_sent"]),
            (attrs["http.request.body.size"], attrs["http.response.body.size"]))


def _trace() -> tuple[str, str]:
    trace = uuid.uuid4().hex
    return trace, f"traceparent: 00-{trace}-00f067aa0ba902b7-01"


def _curl(m: Meshd, *args: str, h2: bool = False) -> bytes:
    r = subprocess.run(["curl", "-sS", "--fail-with-body", *(["--http2-prior-knowledge"] if h2
                                                              else ["--http1.1"]),
                        *args], capture_output=True, timeout=60)
    assert r.returncode == 0, (r.returncode, r.stderr, r.stdout[:300])
    return r.stdout


def _url(m: Meshd, path: str) -> str:
    return f"http://127.0.0.1:{m.ports['outbound']}{path}"


@pytest.mark.parametrize("h2", [False, True], ids=["http1", "h2"])
def test_upload_and_download_of_known_sizes(meshd, receiver, tmp_path, h2):
    m, _ = meshd
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(150_001))
    trace, tp = _trace()
    out = _curl(m, "-H", "Host: web", "-H", tp, "--data-binary", f"@{blob}",
                _url(m, "/upload"), h2=h2)
    assert json.loads(out)["bytes"] == 150_001
    line, logged, span = _counted(meshd, receiver, trace)
    assert logged == span == (150_001, len(out)), line
    # downloads: chunked from the upstream, then with a Content-Length
    for query in ("n=300007", "n=300007&cl=1"):
        trace, tp = _trace()
        out = _curl(m, "-H", "Host: web", "-H", tp, _url(m, f"/bytes?{query}"), h2=h2)
        assert len(out) == 300_007
        line, logged, span = _counted(meshd, receiver, trace)
        assert logged == span == (0, 300_007), line


def test_http1_chunked_upload_counts_the_decoded_body(meshd, receiver, tmp_path):
    m, _ = meshd
    data = os.urandom(200_003)
    trace, tp = _trace()
    r = subprocess.run(["curl", "-sS", "--http1.1", "-H", "Host: web", "-H", tp,
                        "-H", "Transfer-Encoding: chunked", "--data-binary", "@-",
                        _url(m, "/upload")], input=data, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bytes"] == 200_003
    line, logged, span = _counted(meshd, receiver, trace)
    assert logged == span == (200_003, len(r.stdout)), line
    # the response relayed chunked to this client: its body, not its chunk framing
    trace, tp = _trace()
    data = b"e" * 70_001
    r = subprocess.run(["curl", "-sS", "--http1.1", "-H", "Host: web", "-H", tp,
                        "-H", "Transfer-Encoding: chunked", "--data-binary", "@-",
                        _url(m, "/echo")], input=data, capture_output=True, timeout=60)
    assert r.stdout == data
    line, logged, span = _counted(meshd, receiver, trace)
    assert logged == span == (70_001, 70_001), line


def test_h2_padded_data_counts_the_payload(meshd, receiver):
    """A raw HTTP/2 client sends its body in padded DATA frames: the payload is counted,
    the padding is not."""
    m, _ = meshd
    trace, _ = _trace()
    pieces = [os.urandom(1000), os.urandom(16_000), os.urandom(7)]
    with socket.create_connection(("127.0.0.1", m.ports["outbound"]), timeout=10) as s:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "POST"), (":path", "/upload"), (":scheme", "http"),
                              (":authority", "web"),
                              ("traceparent", f"00-{trace}-00f067aa0ba902b7-01")])
        for i, piece in enumerate(pieces):
            conn.send_data(1, piece, end_stream=i == len(pieces) - 1, pad_length=200)
        s.sendall(conn.data_to_send())
        body, ended = b"", False
        deadline = time.monotonic() + 20
        while not ended and time.monotonic() < deadline:
            data = s.recv(65536)
            assert data, "meshd closed the connection"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                ended = ended or isinstance(event, h2.events.StreamEnded)
            s.sendall(conn.data_to_send())
    assert ended and json.loads(body)["bytes"] == 17_007
    line, logged, span = _counted(meshd, receiver, trace)
    assert logged == span == (17_007, len(body)), line


@pytest.mark.parametrize("h2", [False, True], ids=["http1", "h2"])
def test_a_retried_request_counts_its_body_once(meshd, receiver, backends, tmp_path, h2):
    """flaky's keys that first pick c (503) are retried on a: the body went upstream
    twice, the client sent it once, and that is what is counted."""
    m, _ = meshd
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(20_011))
    for i in range(40):  # a key picks c half of the time: 40 misses cannot happen
        trace, tp = _trace()
        r = subprocess.run(["curl", "-sS", "-X", "PUT", "--http2-prior-knowledge" if h2
                            else "--http1.1", "-H", "Host: flaky", "-H", tp,
                            "-H", f"x-key: {'h2' if h2 else 'h1'}-{i}",
                            "--data-binary", f"@{blob}", _url(m, "/upload")],
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
        line, logged, span = _counted(meshd, receiver, trace)
        assert line["status"] == 200 and json.loads(r.stdout)["bytes"] == 20_011, r.stdout
        if line["attempts"] == 2:
            break
    else:
        pytest.fail("no request was retried")
    assert line["endpoint"] == backends[0].address
    assert logged == span == (20_011, len(r.stdout)), line


def test_meshd_answers_and_head_count_what_the_client_got(meshd, receiver):
    m, log = meshd
    port = m.ports["outbound"]

    def raw(request: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(request)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data
    # meshd's own answer: an unknown service
    trace, tp = _trace()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/x", headers={"Host": "nowhere", "traceparent": tp.split(": ")[1]})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    assert resp.status == 503 and body
    line = _entry(log, trace)
    assert (line["bytes_received"], line["bytes_sent"]) == (0, len(body)), line
    # a head refused before parsing: logged with the answer's body
    answer = raw(b"GET /refused-" + uuid.uuid4().hex.encode() + b" HTTP/1.1\r\nHost: a b\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and body
    refused: list[dict[str, Any]] = []

    def logged() -> bool:
        refused[:] = [e for e in map(json.loads, log.read_text().splitlines())
                      if e["path"].startswith("/refused-")]
        return bool(refused)
    assert wait_for(logged, timeout=20)
    assert [(e["status"], e["bytes_received"], e["bytes_sent"]) for e in refused] == \
        [(400, 0, len(body))], refused
    # HEAD: a Content-Length, no body
    trace, tp = _trace()
    answer = raw(f"HEAD /bytes?n=5000&cl=1 HTTP/1.1\r\nHost: web\r\n{tp}\r\n"
                 "Connection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\n")
    line, logged, span = _counted(meshd, receiver, trace)
    assert logged == span == (0, 0), line
    # HTTP/2: meshd's answer to an unknown service, its body counted
    trace, tp = _trace()
    r = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-H", "Host: nowhere",
                        "-H", tp, _url(m, "/x")], capture_output=True, timeout=30)
    assert r.returncode == 0 and r.stdout, r.stderr
    line = _entry(log, trace)
    assert (line["status"], line["bytes_received"], line["bytes_sent"]) == \
        (503, 0, len(r.stdout)), line


def test_a_connect_tunnel_counts_what_it_carried(meshd, receiver):
    m, _ = meshd
    trace, tp = _trace()
    sent = b"early|" + os.urandom(100_003)
    with socket.create_connection(("127.0.0.1", m.ports["outbound"]), timeout=10) as s:
        s.sendall(f"CONNECT echo:80 HTTP/1.1\r\nHost: echo:80\r\n{tp}\r\n\r\n".encode()
                  + sent[:6])
        head, marker, got = read_head(s).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and marker, head
        s.sendall(sent[6:])
        s.shutdown(socket.SHUT_WR)
        while data := s.recv(65536):
            got += data
    assert got == sent
    line, logged, span = _counted(meshd, receiver, trace)
    assert line["method"] == "CONNECT" and line["status"] == 200
    assert logged == span == (len(sent), len(sent)), line


def test_meshd_answer_to_a_connection_close_request_closes(meshd):
    """A request with "Connection: close" that meshd answers itself (unknown service)
    gets the answer, then the connection closes (RFC 9112 §9.6); it used to stay open
    until the client idle timeout."""
    m, _ = meshd
    with socket.create_connection(("127.0.0.1", m.ports["outbound"]), timeout=10) as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: nowhere\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):  # a TimeoutError here: the connection stayed open
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and b"\r\nConnection: close" in head, head
    assert body.endswith(b"\n")
