"""[tracing] through real meshds: W3C and B3 contexts propagated outbound -> inbound ->
application with meshd's span as each hop's parent, spans exported over OTLP/HTTP and
decoded here with ``opentelemetry-proto`` (meshd.testing.otlp_receiver), sampling (the
rate, an incoming flag honoured, context propagated unsampled), HTTP/2 and gRPC clients,
abusive trace headers treated as absent, a collector that is down (traffic unharmed,
drops counted, the queue bounded), and config errors by key path."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from conftest import MeshFactory
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd import config as config_mod
from meshd.errors import ConfigError
from meshd.proto import trace_context
from meshd.proto.h2_headers import request_problem
from meshd.testing.harness import Backend, Meshd, free_port, http_get, wait_for
from meshd.testing.otlp_receiver import OtlpReceiver

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{CLIENT_SPAN}-01"
SERVER, CLIENT = 2, 3  # OTLP SpanKind
W3C = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])")

INBOUND = """
[[listener]]
name = "inbound"
listen = "127.0.0.1:{port}"
direction = "inbound"
protocol = "auto"
forward = "{app}"
"""


def _tracing(endpoint: str, rate: float, extra: str = "") -> str:
    return (f'[tracing]\notlp_endpoint = "{endpoint}"\nsample_rate = {rate}\n'
            f'propagation = ["w3c", "b3"]\n{extra}')


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        yield rx


@pytest.fixture(scope="module")
def factory(tmp_path_factory) -> Iterator[MeshFactory]:
    f = MeshFactory(tmp_path_factory.mktemp("tracing"))
    yield f
    for m in f.started:
        m.stop()


@pytest.fixture(scope="module")
def app() -> Iterator[str]:
    b = Backend("app").start()
    yield b.address
    b.stop()


@pytest.fixture(scope="module")
def pair(factory, receiver, app) -> tuple[Meshd, Meshd]:
    """Outbound meshd A -> inbound meshd B -> the application, both exporting to the
    receiver, sample_rate 0: only an incoming sampled flag records spans."""
    inbound_port = free_port()
    text_b, ports_b = factory.config({}, workers=1, extra=_tracing(receiver.endpoint, 0),
                                     listeners=INBOUND.format(port=inbound_port, app=app))
    b = factory.start(text_b.replace('instance = "', 'instance = "b-'), ports_b)
    meshed = f'{{ address = "{app}", meshed = true, inbound_port = {inbound_port} }}'
    text_a, ports_a = factory.config({}, workers=1, extra=_tracing(receiver.endpoint, 0))
    text_a = text_a.replace("[discovery.services]\n",
                            f"[discovery.services]\nweb = [{meshed}]\n")
    a = factory.start(text_a.replace('instance = "', 'instance = "a-'), ports_a)
    return a, b


@pytest.fixture(scope="module")
def single(factory, receiver, app, tmp_path_factory) -> tuple[Meshd, Path]:
    """One meshd in front of the application, sample_rate 1, with a JSON access log."""
    log = tmp_path_factory.mktemp("alog") / "access.log"
    text, ports = factory.config(
        {"web": [app]}, workers=1,
        extra=_tracing(receiver.endpoint, 1) + f'\n[access_log]\npath = "{log}"\nformat = "json"\n'
        + '[[route]]\nname = "api"\nhost = "web"\npath_prefix = "/api/"\n'
          'backends = [{ service = "web" }]\n')
    return factory.start(text, ports), log


def _get(m: Meshd, headers: dict[str, str] | list[tuple[str, str]],
         path: str = "/headers") -> dict[str, str]:
    """GET through m's outbound listener; the headers the application received."""
    items = list(headers.items()) if isinstance(headers, dict) else headers
    head = "".join(f"{k}: {v}\r\n" for k, v in items)
    with socket.create_connection(("127.0.0.1", m.ports["outbound"]), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: web\r\nConnection: close\r\n{head}\r\n"
                  .encode("latin-1"))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head_part, _, body = data.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 200"), data[:300]
    return json.loads(body)


def _of_trace(trace: str):
    return lambda s: s["trace_id"] == trace


# -- across two meshds -------------------------------------------------------------------

def test_w3c_context_across_two_meshds_parent_child(pair, receiver):
    a, _ = pair
    seen = _get(a, {"traceparent": TRACEPARENT, "tracestate": "vendor=abc,other=1"})
    spans = receiver.wait_spans(2, match=_of_trace(TRACE))
    assert len(spans) == 2, spans
    (out,) = [s for s in spans if s["kind"] == CLIENT]
    (inb,) = [s for s in spans if s["kind"] == SERVER]
    # A's span is the client's child, B's is A's, the application's parent is B's span
    assert out["parent_span_id"] == CLIENT_SPAN
    assert inb["parent_span_id"] == out["span_id"]
    assert seen["traceparent"] == f"00-{TRACE}-{inb['span_id']}-01"
    assert seen["tracestate"] == "vendor=abc,other=1"
    assert "b3" not in seen and "x-b3-traceid" not in seen  # the formats it came as
    for s in (out, inb):
        assert s["attributes"]["http.response.status_code"] == 200
        assert s["attributes"]["http.request.method"] == "GET"
        assert s["attributes"]["url.path"] == "/headers"
        assert s["attributes"]["meshd.attempts"] == 1
        assert s["start"] <= s["end"]
        assert s["resource"]["service.name"].startswith(("a-", "b-"))
    assert out["attributes"]["meshd.direction"] == "outbound"
    assert out["attributes"]["meshd.service"] == "web"
    assert out["attributes"]["meshd.listener"] == "outbound"
    assert out["attributes"]["meshd.endpoint"]
    assert inb["attributes"]["meshd.direction"] == "inbound"
    assert inb["attributes"]["meshd.listener"] == "inbound"
    assert out["name"] == "GET web"
    assert receiver.content_types == {"application/x-protobuf"}
    assert a.wait_metric("meshd_trace_spans_exported_total", at_least=1)


@pytest.mark.parametrize("style", ["multi", "single"])
def test_b3_context_across_two_meshds(pair, receiver, style):
    a, _ = pair
    trace = "463ac35c9f6413ad48485a3953bb6124" if style == "multi" else \
        "80f198ee56343ba864fe8b2a57d3eff7"
    if style == "multi":
        headers = {"X-B3-TraceId": trace, "X-B3-SpanId": "a2fb4a1d1a96d312",
                   "X-B3-ParentSpanId": "0020000000000001", "X-B3-Sampled": "1"}
    else:
        headers = {"b3": f"{trace}-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90"}
    seen = _get(a, headers)
    spans = receiver.wait_spans(2, match=_of_trace(trace))
    (out,) = [s for s in spans if s["kind"] == CLIENT]
    (inb,) = [s for s in spans if s["kind"] == SERVER]
    assert out["parent_span_id"] == ("a2fb4a1d1a96d312" if style == "multi" else "e457b5a2e4d86bd1")
    assert inb["parent_span_id"] == out["span_id"]
    if style == "multi":
        assert seen["x-b3-traceid"] == trace
        assert seen["x-b3-spanid"] == inb["span_id"]
        assert seen["x-b3-parentspanid"] == out["span_id"]
        assert seen["x-b3-sampled"] == "1"
        assert "b3" not in seen
    else:
        assert seen["b3"] == f"{trace}-{inb['span_id']}-1-{out['span_id']}"
        assert "x-b3-traceid" not in seen
    assert "traceparent" not in seen


def test_unsampled_traces_record_nothing_an_incoming_context_propagates(pair, receiver):
    """sample_rate 0 and no context: nothing recorded and nothing added, through both
    meshds (a trace is created only when sampled: no ids, no header rewrite); an
    incoming sampled flag 0 is propagated with meshd's (unrecorded) span as parent. A
    sampled request after them proves both were processed by then."""
    a, _ = pair
    untouched = _get(a, {"x-mark": "1"})
    assert untouched["x-mark"] == "1"
    assert not {"traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-sampled"} & set(untouched)
    unsampled = "11111111111111111111111111111111"
    seen = _get(a, {"traceparent": f"00-{unsampled}-{CLIENT_SPAN}-00"})
    got = W3C.fullmatch(seen["traceparent"])
    assert got and got.group(1) == unsampled and got.group(3) == "00"
    assert got.group(2) != CLIENT_SPAN  # meshd's (unrecorded) span is the parent
    marker = "22222222222222222222222222222222"
    _get(a, {"traceparent": f"00-{marker}-{CLIENT_SPAN}-01"})
    receiver.wait_spans(2, match=_of_trace(marker))
    assert [s for s in receiver.snapshot() if s["trace_id"] == unsampled] == []


# -- one meshd, sample_rate 1 -----------------------------------------------------------

def test_a_trace_starts_when_there_is_none_and_the_access_log_has_its_id(single, receiver):
    m, log = single
    seen = _get(m, {}, path="/headers?new=1")
    match = W3C.fullmatch(seen["traceparent"])
    assert match and match.group(3) == "01"
    trace, parent = match.group(1), match.group(2)
    (span,) = receiver.wait_spans(1, match=_of_trace(trace))
    assert span["span_id"] == parent and span["parent_span_id"] == ""
    assert span["kind"] == CLIENT
    assert seen["b3"] == f"{trace}-{parent}-1"

    def logged() -> bool:
        return any(json.loads(line)["trace_id"] == trace
                   for line in log.read_text().splitlines()) if log.exists() else False
    assert wait_for(logged, timeout=20), log.read_text() if log.exists() else ""


def test_b3_only_propagation_and_the_access_log(factory, receiver, app, tmp_path):
    """propagation = ["b3"]: a trace meshd starts (sampled: it starts none otherwise)
    goes out as b3 alone (an incoming traceparent passes untouched), and the access log
    names meshd's trace."""
    log = tmp_path / "access.log"
    text, ports = factory.config(
        {"web": [app]}, workers=1,
        extra=(f'[tracing]\notlp_endpoint = "{receiver.endpoint}"\nsample_rate = 1\n'
               f'propagation = ["b3"]\n[access_log]\npath = "{log}"\nformat = "json"\n'))
    m = factory.start(text, ports)
    seen = _get(m, {})
    assert "traceparent" not in seen
    trace, span, flag = seen["b3"].split("-")
    assert len(trace) == 32 and len(span) == 16 and flag == "1"
    assert wait_for(lambda: log.exists() and log.read_text().strip(), timeout=20)
    assert json.loads(log.read_text().splitlines()[0])["trace_id"] == trace
    kept = _get(m, {"traceparent": TRACEPARENT})
    assert kept["traceparent"] == TRACEPARENT and kept["b3"].split("-")[0] != TRACE
    m.stop()


def test_a_routed_request_names_its_route(single, receiver):
    m, _ = single
    trace = "abababababababababababababababab"
    status, _, _ = http_get("127.0.0.1", m.ports["outbound"], "/api/things?secret=1",
                            {"Host": "web", "traceparent": f"00-{trace}-{CLIENT_SPAN}-01"})
    assert status == 200
    (span,) = receiver.wait_spans(1, match=_of_trace(trace))
    assert span["name"] == "GET api"
    assert span["attributes"]["http.route"] == "api"
    assert span["attributes"]["url.path"] == "/api/things"  # the query is not exported
    assert span["attributes"]["server.address"] == "web"


def test_an_incoming_unsampled_flag_is_honoured(single, receiver):
    m, _ = single
    quiet = "33333333333333333333333333333333"
    seen = _get(m, {"traceparent": f"00-{quiet}-{CLIENT_SPAN}-00"})
    assert seen["traceparent"].endswith("-00") and quiet in seen["traceparent"]
    marker = "44444444444444444444444444444444"
    _get(m, {"traceparent": f"00-{marker}-{CLIENT_SPAN}-01"})
    receiver.wait_spans(1, match=_of_trace(marker))
    assert [s for s in receiver.snapshot() if s["trace_id"] == quiet] == []


ABUSE = [
    ("malformed", [("traceparent", "00-zz-yy-01")]),
    ("upper-case", [("traceparent", TRACEPARENT.upper())]),
    ("zero trace id", [("traceparent", f"00-{'0' * 32}-{CLIENT_SPAN}-01")]),
    ("version ff", [("traceparent", f"ff-{TRACE}-{CLIENT_SPAN}-01")]),
    ("v00 with extra", [("traceparent", TRACEPARENT + "-extra")]),
    ("oversized", [("traceparent", TRACEPARENT + "-" + "a" * 6000)]),
    ("duplicated", [("traceparent", TRACEPARENT),
                    ("traceparent", f"00-{'5' * 32}-{CLIENT_SPAN}-01")]),
    ("bad b3", [("b3", f"{TRACE}-nothex-1")]),
    ("duplicated b3 multi", [("X-B3-TraceId", TRACE), ("X-B3-TraceId", TRACE),
                             ("X-B3-SpanId", CLIENT_SPAN)]),
    ("b3 multi without span id", [("X-B3-TraceId", TRACE), ("X-B3-Sampled", "1")]),
    ("tracestate without traceparent", [("tracestate", "a=b")]),
]


@pytest.mark.parametrize("case", ABUSE, ids=[c[0] for c in ABUSE])
def test_abusive_trace_headers_start_a_new_trace(single, receiver, case):
    m, _ = single
    _, headers = case
    seen = _get(m, headers)
    match = W3C.fullmatch(seen["traceparent"])
    assert match, seen  # one valid traceparent, of a new trace
    trace = match.group(1)
    assert trace not in (TRACE, "5" * 32)
    assert "tracestate" not in seen
    assert "x-b3-traceid" not in seen  # the bad fields are gone, not forwarded
    (span,) = receiver.wait_spans(1, match=_of_trace(trace))
    assert span["parent_span_id"] == ""


def test_oversized_tracestate_is_dropped_the_traceparent_kept(single, receiver):
    m, _ = single
    trace = "66666666666666666666666666666666"
    seen = _get(m, {"traceparent": f"00-{trace}-{CLIENT_SPAN}-01",
                    "tracestate": ",".join(f"k{i}=v" for i in range(200))})
    assert seen["traceparent"].startswith(f"00-{trace}-")
    assert "tracestate" not in seen
    receiver.wait_spans(1, match=_of_trace(trace))


def test_http2_client_context_propagated(single, receiver):
    m, _ = single
    trace = "77777777777777777777777777777777"
    out = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "-H", "Host: web",
         "-H", f"traceparent: 00-{trace}-{CLIENT_SPAN}-01",
         f"http://127.0.0.1:{m.ports['outbound']}/headers"],
        capture_output=True, timeout=30, check=True)
    seen = json.loads(out.stdout)
    (span,) = receiver.wait_spans(1, match=_of_trace(trace))
    assert span["parent_span_id"] == CLIENT_SPAN
    assert seen["traceparent"] == f"00-{trace}-{span['span_id']}-01"
    # over HTTP/2 too, a repeated traceparent holds no context: a new trace
    out = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "-H", "Host: web",
         "-H", f"traceparent: 00-{trace}-{CLIENT_SPAN}-01",
         "-H", f"traceparent: 00-{'9' * 32}-{CLIENT_SPAN}-01",
         f"http://127.0.0.1:{m.ports['outbound']}/headers"],
        capture_output=True, timeout=30, check=True)
    match = W3C.fullmatch(json.loads(out.stdout)["traceparent"])
    assert match and match.group(1) not in (trace, "9" * 32)
    (span,) = receiver.wait_spans(1, match=_of_trace(match.group(1)))
    assert span["parent_span_id"] == ""


class _Recorder:
    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.metadata.append(dict(context.invocation_metadata()))
        if request == b"fail":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        return request


def test_grpc_span_has_its_status_and_the_server_gets_the_context(factory, receiver):
    recorder = _Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    raw = {"request_deserializer": None, "response_serializer": None}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(recorder.unary, **raw)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        text, ports = factory.config({"echo": [f"127.0.0.1:{port}"]}, workers=1,
                                     extra=_tracing(receiver.endpoint, 0))
        m = factory.start(text, ports)
        trace = "88888888888888888888888888888888"
        with grpc.insecure_channel(f"127.0.0.1:{ports['outbound']}",
                                   options=[("grpc.default_authority", "echo")]) as ch:
            call = ch.unary_unary("/t.Echo/Unary")
            md = (("traceparent", f"00-{trace}-{CLIENT_SPAN}-01"),)
            assert call(b"ok", metadata=md, timeout=10) == b"ok"
            with pytest.raises(grpc.RpcError):
                call(b"fail", metadata=md, timeout=10)
        spans = receiver.wait_spans(2, match=_of_trace(trace))
        by_status = {s["attributes"]["rpc.grpc.status_code"]: s for s in spans}
        assert set(by_status) == {0, 5}
        assert by_status[5]["status"] == 2 and by_status[0]["status"] == 0  # ERROR, UNSET
        assert by_status[0]["attributes"]["meshd.service"] == "echo"
        parents = {md["traceparent"] for md in recorder.metadata}
        assert parents == {f"00-{trace}-{s['span_id']}-01" for s in spans}
        m.stop()
    finally:
        server.stop(0)


# -- a collector that is down ------------------------------------------------------------

def test_collector_down_traffic_fine_drops_counted_queue_bounded(factory, app):
    dead = f"http://127.0.0.1:{free_port()}/v1/traces"
    text, ports = factory.config({"web": [app]}, workers=1,
                                 extra=_tracing(dead, 1, "queue = 16\nbatch_size = 8\n"
                                                         'export_timeout = "1s"\n'))
    m = factory.start(text, ports)
    sent = 300
    conn = http.client.HTTPConnection("127.0.0.1", ports["outbound"], timeout=10)
    for i in range(sent):
        conn.request("GET", f"/n{i}", headers={"Host": "web"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
    conn.close()
    assert m.wait_metric("meshd_trace_spans_dropped_total", 'reason="export_failed"', 1)

    def accounted() -> bool:  # every span but at most a queue's worth is counted dropped
        full = m.metric("meshd_trace_spans_dropped_total", 'reason="queue_full"')
        failed = m.metric("meshd_trace_spans_dropped_total", 'reason="export_failed"')
        return full + failed >= sent - 16
    assert wait_for(accounted, timeout=20)
    assert m.metric("meshd_trace_spans_exported_total") == 0
    assert m.metric("meshd_trace_spans_dropped_total", 'reason="queue_full"') > 0
    assert "tracing: export to" in m.log()
    status, _, _ = http_get("127.0.0.1", ports["outbound"], "/after", {"Host": "web"})
    assert status == 200
    # a HUP with a bad [tracing] is refused like any bad config; traffic goes on
    m.config_path.write_text(text.replace("sample_rate = 1", "sample_rate = 7"))
    m.signal(signal.SIGHUP)
    assert m.wait_metric("meshd_config_reloads_total", 'result="failure"', 1)
    assert "tracing.sample_rate" in m.log()
    assert http_get("127.0.0.1", ports["outbound"], "/after", {"Host": "web"})[0] == 200
    m.stop()


# -- the propagation core (sans-IO) ------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"traceparent", b"tracestate", b"b3",
                                           b"x-b3-traceid", b"x-b3-spanid", b"x-b3-sampled",
                                           b"x-b3-flags", b"x-b3-parentspanid", b"other"]),
                          st.binary(max_size=80)), max_size=8))
def test_any_trace_fields_give_a_valid_head(fields):
    """Whatever a client sends, what meshd writes back is a valid HTTP/2 head (the
    stricter of the two) and holds one valid traceparent."""
    safe = [(k, v.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"").strip())
            for k, v in fields]
    ctx, relevant = trace_context.extract(safe, ("w3c", "b3"))
    out = trace_context.inject(safe, ("w3c", "b3"), "ab" * 16, "cd" * 8,
                               ctx.span_id if ctx else "", True,
                               ctx.came_as if ctx and ctx.span_id else (),
                               ctx.tracestate if ctx else None, strip=relevant)
    ours = [(k, v) for k, v in out if k in trace_context.ALL_NAMES]
    assert request_problem([(b":method", b"GET"), (b":scheme", b"http"),
                            (b":path", b"/"), (b":authority", b"a")] + ours) is None
    assert len([v for k, v in out if k == b"traceparent"]) <= 1


@pytest.mark.parametrize("fields, expected", [
    # a later version may append fields; meshd writes version 00 back
    ([(b"traceparent", f"01-{TRACE}-{CLIENT_SPAN}-01-more".encode())], (TRACE, CLIENT_SPAN, True)),
    ([(b"traceparent", f"00-{TRACE}-{CLIENT_SPAN}-00".encode())], (TRACE, CLIENT_SPAN, False)),
    ([(b"traceparent", f"00-{TRACE}-{'0' * 16}-01".encode())], None),
    # B3: a 64-bit trace id padded to 128; no sampling state leaves the decision to meshd
    ([(b"b3", b"a3ce929d0e0e4736-00f067aa0ba902b7")], ("0" * 16 + "a3ce929d0e0e4736", CLIENT_SPAN, None)),
    ([(b"b3", f"{TRACE}-{CLIENT_SPAN}-d".encode())], (TRACE, CLIENT_SPAN, True)),
    ([(b"X-B3-TraceId", TRACE.encode()), (b"X-B3-SpanId", CLIENT_SPAN.encode()),
      (b"X-B3-Flags", b"1"), (b"X-B3-Sampled", b"0")], (TRACE, CLIENT_SPAN, True)),
    ([(b"X-B3-TraceId", TRACE.encode()), (b"X-B3-SpanId", CLIENT_SPAN.encode()),
      (b"X-B3-Sampled", b"maybe")], None),
    ([(b"b3", b"0")], ("0" * 32, "", False)),  # a decision alone: a new trace, unsampled
])
def test_extract_cases(fields, expected):
    ctx, relevant = trace_context.extract(fields, ("w3c", "b3"))
    assert relevant
    assert (None if ctx is None else (ctx.trace_id, ctx.span_id, ctx.sampled)) == expected


def test_a_context_in_both_formats_is_written_back_in_both():
    fields = [(b"traceparent", TRACEPARENT.encode()),
              (b"b3", f"{TRACE}-{CLIENT_SPAN}-1".encode()), (b"x-other", b"1")]
    ctx, relevant = trace_context.extract(fields, ("w3c", "b3"))
    assert ctx is not None and ctx.came_as == ("w3c", "b3")
    out = trace_context.inject(fields, ("w3c", "b3"), ctx.trace_id, "1" * 16, ctx.span_id,
                               True, ctx.came_as, None, strip=relevant)
    assert out == [(b"x-other", b"1"), (b"traceparent", f"00-{TRACE}-{'1' * 16}-01".encode()),
                   (b"b3", f"{TRACE}-{'1' * 16}-1-{CLIENT_SPAN}".encode())]


# -- config --------------------------------------------------------------------------------

BASE = {"listener": [{"name": "o", "listen": "127.0.0.1:1", "direction": "outbound"}]}


@pytest.mark.parametrize("table, key", [
    ({"otlp_endpoint": "https://c:4318/v1/traces"}, "tracing.otlp_endpoint"),
    ({"otlp_endpoint": "c:4318"}, "tracing.otlp_endpoint"),
    ({"sample_rate": 1.5}, "tracing.sample_rate"),
    ({"sample_rate": "0.1"}, "tracing.sample_rate"),
    ({"propagation": ["w3c", "jaeger"]}, "tracing.propagation"),
    ({"propagation": []}, "tracing.propagation"),
    ({"queue": 1}, "tracing.queue"),
    ({"export_timeout": 5}, "tracing.export_timeout"),
    ({"sample": 1}, "tracing.sample"),
])
def test_config_errors_by_key_path(table, key):
    with pytest.raises(ConfigError) as e:
        config_mod.parse({**BASE, "tracing": table})
    assert key in str(e.value)


def test_config_defaults_and_absent_table():
    assert config_mod.parse(BASE).tracing is None
    t = config_mod.parse({**BASE, "instance": "edge", "tracing": {}}).tracing
    assert t is not None
    assert (t.otlp_endpoint, t.sample_rate, t.propagation, t.service_name) == (
        "http://127.0.0.1:4318/v1/traces", 0.01, ("w3c", "b3"), "edge")
    assert t.target == ("127.0.0.1", 4318, "/v1/traces")


def test_meshd_check_reports_tracing_errors(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('[[listener]]\nname = "o"\nlisten = "127.0.0.1:1"\ndirection = "outbound"\n'
                    '[tracing]\nsample_rate = 2\n')
    out = subprocess.run([sys.executable, "-m", "meshd", "check", "-c", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "tracing.sample_rate" in out.stdout + out.stderr
