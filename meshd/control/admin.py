"""The admin HTTP API (WSGI, served by gevent.pywsgi in the control process).

``/live``, ``/ready``, ``/metrics`` (Prometheus text summed over workers), ``/stats``
(JSON: what `meshd stat` prints) and ``/endpoints`` (JSON: services and endpoints).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from meshd.metrics import render_prometheus, row_keys, serving_workers
from meshd.shm import OFF_DESIRED

if TYPE_CHECKING:
    from meshd.control.process import Control

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
READY_NAMES = 10   # services /ready names when it waits for discovery (then "and N more")


class AdminApp:
    def __init__(self, control: Control) -> None:
        self.control = control
        self.routes: dict[str, Callable[[], tuple[str, str, bytes]]] = {
            "/live": self.live,
            "/ready": self.ready,
            "/metrics": self.metrics,
            "/stats": self.stats,
            "/endpoints": self.endpoints,
        }

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        route = self.routes.get(environ.get("PATH_INFO", ""))
        if route is None:
            status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
        elif environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
        else:
            status, ctype, body = route()
        start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
        return [body]

    def live(self) -> tuple[str, str, bytes]:
        alive = os.getppid() == self.control.ctx.master_pid
        return ("200 OK" if alive else "503 Service Unavailable"), "text/plain", (
            b"live\n" if alive else b"master gone\n")

    def ready(self) -> tuple[str, str, bytes]:
        """200 "ready", or 503 naming what it waits for: workers not serving yet, each
        service whose first answer a source still owes (at most READY_NAMES of them), the
        first endpoints not yet handed to the workers."""
        c = self.control
        serving = serving_workers(c.region)
        desired = c.region.get_u32(OFF_DESIRED)
        published = c.discovery.first_published.is_set()
        pending = [(w.name, [src for src, st in w.sources.items() if not (st.synced or st.stale)])
                   for w in c.discovery.watches.values() if not w.synced]
        if serving >= desired and not pending and published:
            return "200 OK", "text/plain", b"ready\n"
        waiting = []
        if serving < desired:
            waiting.append(f"workers: {serving} of {desired} serving")
        if pending:
            names = ", ".join(f"{name} (source {', '.join(srcs)})"
                              for name, srcs in pending[:READY_NAMES])
            more = f" and {len(pending) - READY_NAMES} more" if len(pending) > READY_NAMES else ""
            waiting.append(f"discovery: first answer for {names}{more}")
        if not published:
            waiting.append("endpoints: not yet published to the workers")
        return ("503 Service Unavailable", "text/plain",
                ("not ready, waiting for " + "; ".join(waiting) + "\n").encode())

    def metrics(self) -> tuple[str, str, bytes]:
        c = self.control
        keys = row_keys(c.config, c.discovery.rows.rows)
        text = render_prometheus(c.region, keys) + "\n".join(c.discovery.prometheus()) + "\n"
        return "200 OK", "text/plain; version=0.0.4; charset=utf-8", text.encode()

    def stats(self) -> tuple[str, str, bytes]:
        c = self.control
        keys = row_keys(c.config, c.discovery.rows.rows)
        c.sample_stats()
        body = {"generation": c.ctx.generation, "rows": c.stat_window.figures(keys)}
        return "200 OK", "application/json", json.dumps(body, indent=1).encode() + b"\n"

    def endpoints(self) -> tuple[str, str, bytes]:
        body = self.control.discovery.describe()
        return "200 OK", "application/json", json.dumps(body, indent=1).encode() + b"\n"
