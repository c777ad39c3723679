"""Fleet control from the Kubernetes Gateway API: write-to-traffic latency of a canary
change, and the control process's cost with many Services each having an HTTPRoute.

latency: meshd (1 worker) with the kubernetes config source against the in-tree
Kubernetes API test server and two backends behind services ``web`` and ``web-canary``
(static discovery). ``--changes`` times, the HTTPRoute ``web-canary`` is applied with
the weights flipped (100/0, then 0/100, ...), and a client that sends keep-alive requests
back to back records the time from the write (``apply`` returned: the API server stored
it and queued the watch event) to the first answer from the newly weighted backend.

scale: ``--services`` Services, each with one endpoint (a shared backend) and an
HTTPRoute (a path rule with its own timeout, and a 90/10 weighted default rule, the
equivalent of a Consul router plus splitter), against a run with the same Services and
no routes. Reported: the control process's RSS once every route is applied (``/config``
shows them all), its CPU to get there, and its CPU at rest afterwards.

    .venv/bin/python scripts/bench_fleet_k8s.py latency [--changes 30]
    .venv/bin/python scripts/bench_fleet_k8s.py scale [--services 1000]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from meshd.testing.harness import Backend, Meshd, free_port, http_get, process_usage, wait_for
from meshd.testing.k8s_server import K8sApiServer, backend, http_route


def config(tmp: Path, api: K8sApiServer, services: dict[str, str], admin: int,
           outbound: int) -> Path:
    token = tmp / "token"
    token.write_text("test-token\n")
    svc = "\n".join(f'"{n}" = ["{a}"]' for n, a in services.items())
    text = textwrap.dedent(f"""\
        workers = 1
        state_dir = "{tmp}/state"
        shm_dir = "{tmp}/shm"
        instance = "bench-fleet-k8s"
        [admin]
        listen = "127.0.0.1:{admin}"
        [[listener]]
        name = "outbound"
        listen = "127.0.0.1:{outbound}"
        direction = "outbound"
        protocol = "http"
        [[config_source]]
        name = "k8s"
        plugin = "kubernetes"
        api_server = "{api.url}"
        token_file = "{token}"
        ca_file = "{api.ca_file}"
        namespace = "default"
        [[discovery]]
        name = "local"
        plugin = "static"
        [discovery.services]
        """) + svc + "\n"
    path = tmp / "meshd.toml"
    path.write_text(text)
    return path


def start(tmp: Path, api: K8sApiServer, services: dict[str, str]) -> tuple[Meshd, int, int]:
    admin, outbound = free_port(), free_port()
    m = Meshd(config(tmp, api, services, admin, outbound), tmp / "meshd.log",
              admin=f"127.0.0.1:{admin}")
    m.start(timeout=120)
    return m, admin, outbound


def canary(weight: int) -> dict:
    return http_route("web-canary", "web", [
        {"backendRefs": [backend("web", 100 - weight), backend("web-canary", weight)]}])


def latency(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-k8s-"))
    api = K8sApiServer().start()
    a, b = Backend("stable").start(), Backend("canary").start()
    m = None
    try:
        api.apply(canary(0))
        m, admin, outbound = start(tmp, api, {"web": a.address, "web-canary": b.address})
        conn = http.client.HTTPConnection("127.0.0.1", outbound, timeout=10)

        def who() -> str:
            conn.request("GET", "/", headers={"Host": "web"})
            resp = conn.getresponse()
            resp.read()
            return resp.getheader("x-backend") or f"status {resp.status}"

        wait_for(lambda: who() == "stable", 20, what="routed to stable")
        took = []
        for i in range(args.changes):
            want = "canary" if i % 2 == 0 else "stable"
            api.apply(canary(100 if want == "canary" else 0))
            written = time.monotonic()
            deadline = written + 10
            while who() != want:
                if time.monotonic() > deadline:
                    raise SystemExit(f"change {i}: no answer from {want} after 10 s")
            took.append((time.monotonic() - written) * 1000)
            time.sleep(0.05)   # let the control process go idle between changes
        took.sort()
        p99 = took[min(len(took) - 1, int(len(took) * 0.99))]
        print(json.dumps({"changes": len(took), "p50_ms": round(statistics.median(took), 1),
                          "p99_ms": round(p99, 1), "max_ms": round(took[-1], 1),
                          "all_ms": [round(t, 1) for t in took]}))
    finally:
        if m is not None:
            m.stop()
        a.stop()
        b.stop()
        api.close()


def scale_run(n: int, routes: bool, rest: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-k8s-"))
    api = K8sApiServer(history_window=10 * n + 100).start()
    shared = Backend("shared").start()
    m = None
    try:
        names = [f"s{i}" for i in range(n)]
        if routes:
            for s in names:
                api.apply(http_route(s, s, [
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/reports"}}],
                     "timeouts": {"request": "30s"}, "backendRefs": [backend(s)]},
                    {"backendRefs": [backend(s, 90), backend("canary", 10)]}]))
        services = {s: shared.address for s in names}
        services["canary"] = shared.address
        started = time.monotonic()
        m, admin, _ = start(tmp, api, services)
        control = m.control_pids()[0]

        def applied() -> bool:
            status, _, body = http_get("127.0.0.1", admin, "/config", timeout=30)
            if status != 200:
                return False
            fleet = json.loads(body)["fleet"]["services"]
            done = sum(1 for s in names
                       if fleet.get(s, {}).get("sources", {}).get("k8s", {}).get("synced"))
            if routes:
                done = sum(1 for s in names
                           if "routes" in fleet.get(s, {}).get("effective", {}))
            return done == n
        wait_for(applied, 300, interval=1.0, what=f"{n} services' routes applied")
        ready_s = time.monotonic() - started
        rss, cpu = process_usage(control)
        time.sleep(rest)
        _, cpu_after = process_usage(control)
        return {"services": n, "routes": routes, "applied_s": round(ready_s, 1),
                "control_rss_mib": round(rss, 1), "control_cpu_s_to_applied": round(cpu, 2),
                "control_rest_cpu_pct": round(100 * (cpu_after - cpu) / rest, 2),
                "watch_streams": api.max_open_watches}
    finally:
        if m is not None:
            m.stop()
        shared.stop()
        api.close()


def scale(args: argparse.Namespace) -> None:
    for routes in (False, True):
        print(json.dumps(scale_run(args.services, routes, args.rest)), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    lat = sub.add_parser("latency")
    lat.add_argument("--changes", type=int, default=30)
    sc = sub.add_parser("scale")
    sc.add_argument("--services", type=int, default=1000)
    sc.add_argument("--rest", type=float, default=10.0)
    args = p.parse_args()
    {"latency": latency, "scale": scale}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
