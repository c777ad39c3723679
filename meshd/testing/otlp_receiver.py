"""An OTLP/HTTP trace receiver for tests and benchmarks: a threading HTTP server on
loopback that decodes each POSTed ``ExportTraceServiceRequest`` with
``opentelemetry-proto`` (the official message definitions, not meshd's encoder) and
keeps the spans it held as plain dicts.

    with OtlpReceiver() as rx:        # rx.endpoint: "http://127.0.0.1:PORT/v1/traces"
        ...
        spans = rx.wait_spans(2)      # [{"trace_id": hex, "span_id": hex, ...}]

``status`` (settable) is what it answers (200 unless a test wants a refusing collector);
``requests`` counts export requests, ``bad`` those that did not decode.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_BODY = 16 * 1024 * 1024


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def span_dict(resource: dict[str, Any], span: Any) -> dict[str, Any]:
    return {
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent_span_id": span.parent_span_id.hex(),
        "name": span.name,
        "kind": span.kind,
        "start": span.start_time_unix_nano,
        "end": span.end_time_unix_nano,
        "status": span.status.code,
        "attributes": {a.key: _value(a.value) for a in span.attributes},
        "resource": resource,
    }


class OtlpReceiver:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
        request_type = trace_service_pb2.ExportTraceServiceRequest
        response = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.spans: list[dict[str, Any]] = []
        self.requests = 0
        self.bad = 0
        self.status = 200
        self.content_types: set[str] = set()
        lock = threading.Lock()
        self._lock = lock
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(min(length, MAX_BODY))
                spans = []
                ok = True
                try:
                    req = request_type.FromString(body)
                    for rs in req.resource_spans:
                        resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                        for ss in rs.scope_spans:
                            spans += [span_dict(resource, s) for s in ss.spans]
                except Exception:
                    ok = False
                with lock:
                    receiver.requests += 1
                    receiver.content_types.add(self.headers.get("Content-Type", ""))
                    status = receiver.status
                    if not ok:
                        receiver.bad += 1
                    elif status == 200:
                        receiver.spans += spans
                out = response if status == 200 and ok else b""
                self.send_response(status if ok else 400)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.endpoint = f"http://{host}:{self.port}/v1/traces"
        self._thread: threading.Thread | None = None

    def start(self) -> OtlpReceiver:
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.spans)

    def clear(self) -> None:
        with self._lock:
            self.spans.clear()

    def wait_spans(self, n: int = 1, timeout: float = 20.0, match: Any = None
                   ) -> list[dict[str, Any]]:
        """The spans received (those ``match`` accepts) once there are ``n``; raises
        TimeoutError with what came when they do not within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            spans = [s for s in self.snapshot() if match is None or match(s)]
            if len(spans) >= n:
                return spans
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(spans)} spans of {n} after {timeout}s: {spans!r}")
            time.sleep(0.05)
