"""gRPC through a real meshd with grpcio on both sides (HTTP/2 in, HTTP/2 out): unary,
server-streaming, client-streaming and bidirectional calls, status codes and messages
in trailers, deadlines and cancellation reaching the server. The interop test list of
gRPC (empty_unary, large_unary, *_streaming, ping_pong, status_code_and_message,
timeout_on_sleeping_server, cancel_after_first_response) is the guide; messages are
raw bytes so no generated code is needed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

SERVICE = "meshd.test.Echo"
_raw = {"request_deserializer": None, "response_serializer": None}


class EchoServicer:
    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.sleeping_done = threading.Event()

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if request.startswith(b"status:"):
            _, code, message = request.split(b":", 2)
            context.abort(grpc.StatusCode[code.decode()], message.decode())
        if request.startswith(b"sleep:"):
            context.add_callback(self.cancelled.set)
            deadline = time.monotonic() + float(request[6:])
            while time.monotonic() < deadline and context.is_active():
                time.sleep(0.01)
            self.sleeping_done.set()
            return b"woke"
        context.set_trailing_metadata((("x-trailer", "t1"),))
        return request

    def server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        context.add_callback(self.cancelled.set)
        count, size = (int(x) for x in request.split(b"x"))
        for i in range(count):
            if not context.is_active():
                return
            yield bytes([i % 256]) * size
            if request.endswith(b"x1"):
                time.sleep(0.05)

    def client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        total = n = 0
        for r in requests:
            total += len(r)
            n += 1
        return b"%d/%d" % (n, total)

    def bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for r in requests:
            yield r[::-1]


@pytest.fixture
def grpc_backend():
    servicer = EchoServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(servicer.unary, **_raw),
        "ServerStream": grpc.unary_stream_rpc_method_handler(servicer.server_stream, **_raw),
        "ClientStream": grpc.stream_unary_rpc_method_handler(servicer.client_stream, **_raw),
        "Bidi": grpc.stream_stream_rpc_method_handler(servicer.bidi, **_raw),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(0)


@pytest.fixture
def channel(mesh, grpc_backend):
    servicer, port = grpc_backend
    m = mesh.run({"echo": [f"127.0.0.1:{port}"]})
    ch = grpc.insecure_channel(f"127.0.0.1:{m.ports['outbound']}",
                               options=[("grpc.default_authority", "echo")])
    yield ch, servicer, m
    ch.close()


def _methods(ch: grpc.Channel) -> dict:
    return {
        "unary": ch.unary_unary(f"/{SERVICE}/Unary"),
        "server_stream": ch.unary_stream(f"/{SERVICE}/ServerStream"),
        "client_stream": ch.stream_unary(f"/{SERVICE}/ClientStream"),
        "bidi": ch.stream_stream(f"/{SERVICE}/Bidi"),
    }


def test_unary_calls_small_empty_and_large(channel):
    ch, _, _ = channel
    unary = _methods(ch)["unary"]
    assert unary(b"hello", timeout=10) == b"hello"
    assert unary(b"", timeout=10) == b""  # empty_unary
    big = bytes(range(256)) * 1024 * 2  # 512 KiB: several DATA frames and window updates
    response, call = unary.with_call(big, timeout=10)
    assert response == big
    assert ("x-trailer", "t1") in call.trailing_metadata()
    # many calls multiplexed on the one channel
    with futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: unary(b"m%d" % i, timeout=10), range(200)))
    assert results == [b"m%d" % i for i in range(200)]


def test_streaming_calls(channel):
    ch, _, _ = channel
    m = _methods(ch)
    chunks = list(m["server_stream"](b"50x3000", timeout=10))
    assert len(chunks) == 50 and all(c == bytes([i]) * 3000 for i, c in enumerate(chunks))
    assert m["client_stream"](iter([b"a" * 100] * 40), timeout=10) == b"40/4000"
    replies = list(m["bidi"](iter([b"abc", b"hello", b"x" * 70000]), timeout=10))
    assert replies == [b"cba", b"olleh", b"x" * 70000]


def test_ping_pong_one_message_at_a_time(channel):
    ch, _, _ = channel
    import queue
    outgoing: queue.Queue = queue.Queue()

    def requests() -> Iterator[bytes]:
        while (item := outgoing.get()) is not None:
            yield item
    call = _methods(ch)["bidi"](requests(), timeout=10)
    for word in (b"one", b"two", b"three"):
        outgoing.put(word)
        assert next(call) == word[::-1]  # each answer arrives before the next request
    outgoing.put(None)
    assert list(call) == []


@pytest.mark.parametrize("code", ["NOT_FOUND", "PERMISSION_DENIED", "UNAVAILABLE", "INTERNAL"])
def test_status_codes_and_messages_travel_in_trailers(channel, code):
    ch, _, _ = channel
    with pytest.raises(grpc.RpcError) as e:
        _methods(ch)["unary"](f"status:{code}:no such thing \u2014 {code}".encode(), timeout=10)
    assert e.value.code() == grpc.StatusCode[code]
    assert e.value.details() == f"no such thing \u2014 {code}"


def test_deadline_reaches_the_server_as_cancellation(channel):
    ch, servicer, _ = channel
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        _methods(ch)["unary"](b"sleep:5", timeout=0.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3
    # the server learned: its context was cancelled long before its 5 s sleep ended
    assert servicer.cancelled.wait(3)
    assert servicer.sleeping_done.wait(3)


def test_cancel_after_first_response_reaches_the_server(channel):
    ch, servicer, _ = channel
    call = _methods(ch)["server_stream"](b"1000x1", timeout=30)
    assert next(call) == b"\x00"
    call.cancel()
    assert servicer.cancelled.wait(5)
    with pytest.raises(grpc.RpcError) as e:
        list(call)
    assert e.value.code() == grpc.StatusCode.CANCELLED


def test_an_unknown_service_is_unavailable_with_the_reason(mesh, grpc_backend):
    _, port = grpc_backend
    m = mesh.run({"echo": [f"127.0.0.1:{port}"]})
    with grpc.insecure_channel(f"127.0.0.1:{m.ports['outbound']}",
                               options=[("grpc.default_authority", "nowhere")]) as ch:
        with pytest.raises(grpc.RpcError) as e:
            _methods(ch)["unary"](b"x", timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # grpcio maps HTTP 503 so
