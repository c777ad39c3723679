"""Authorization from Kubernetes: write-to-decision latency of an AuthorizationPolicy edit.

meshd (1 worker, ``[identity]`` with the files provider and a throwaway CA) with an
inbound mTLS listener serving Service ``web`` and the kubernetes config source against
the in-tree Kubernetes API test server. ``--changes`` times, the policy ``web-callers``
is applied alternately allowing the client's identity and another one, and a client
with a certificate (keep-alive requests back to back over mTLS, reconnecting when meshd
closes) records the time from the write (``apply`` returned) to the first answer with
the new decision (200 <-> 403).

    .venv/bin/python scripts/bench_fleet_k8s_authz.py [--changes 30]
"""

from __future__ import annotations

import argparse
import http.client
import os
import ssl
import statistics
import tempfile
import textwrap
import time
from pathlib import Path

from meshd.identity import ca
from meshd.testing.harness import Backend, Meshd, free_port
from meshd.testing.k8s_server import K8sApiServer, authorization_policy

TD = "cluster.local"
CLIENT = f"{TD}/ns/default/sa/frontend"
OTHER = f"{TD}/ns/default/sa/billing"


def write(path: Path, data: bytes) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--changes", type=int, default=30)
    args = ap.parse_args()
    app = Backend("app").start()
    with tempfile.TemporaryDirectory() as d, K8sApiServer() as api:
        tmp = Path(d)
        authority = ca.new_ca(TD)
        leaf = ca.issue(authority, f"spiffe://{TD}/ns/default/sa/web")
        client = ca.issue(authority, f"spiffe://{CLIENT}")
        files = {n: write(tmp / n, data) for n, data in (
            ("ca.crt", authority.cert_pem), ("tls.crt", leaf.cert_pem),
            ("tls.key", leaf.key_pem), ("client.crt", client.cert_pem),
            ("client.key", client.key_pem))}
        (tmp / "token").write_text("test-token\n")
        admin, inbound = free_port(), free_port()
        cfg = tmp / "meshd.toml"
        cfg.write_text(textwrap.dedent(f"""\
            workers = 1
            state_dir = "{tmp}/state"
            shm_dir = "{tmp}/shm"
            instance = "bench-fleet-k8s-authz"
            [admin]
            listen = "127.0.0.1:{admin}"
            [[listener]]
            name = "inbound"
            listen = "127.0.0.1:{inbound}"
            direction = "inbound"
            forward = "{app.host}:{app.port}"
            mtls = "strict"
            service = "web"
            [identity]
            provider = "files"
            trust_domain = "{TD}"
            cert_file = "{files['tls.crt']}"
            key_file = "{files['tls.key']}"
            ca_file = "{files['ca.crt']}"
            [[config_source]]
            name = "k8s"
            plugin = "kubernetes"
            api_server = "{api.url}"
            token_file = "{tmp}/token"
            ca_file = "{api.ca_file}"
            namespace = "default"
            """))
        ctx = ssl.create_default_context(cafile=files["ca.crt"])
        ctx.check_hostname = False
        ctx.load_cert_chain(files["client.crt"], files["client.key"])
        m = Meshd(cfg, tmp / "meshd.log", admin=f"127.0.0.1:{admin}").start()
        try:
            conn: http.client.HTTPSConnection | None = None

            def status() -> int:
                nonlocal conn
                if conn is None:
                    conn = http.client.HTTPSConnection("127.0.0.1", inbound, context=ctx,
                                                       timeout=10)
                try:
                    conn.request("GET", "/", headers={"Host": "web"})
                    r = conn.getresponse()
                    r.read()
                    if r.getheader("Connection", "").lower() == "close":
                        conn.close()
                        conn = None
                    return r.status
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = None
                    return 0

            took = []
            for i in range(args.changes + 1):
                allowed = i % 2 == 0
                who = CLIENT if allowed else OTHER
                api.apply(authorization_policy("web-callers", "web", [
                    {"from": [{"source": {"principals": [who]}}]}]))
                written = time.monotonic()
                want = 200 if allowed else 403
                deadline = written + 30
                while status() != want:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"change {i}: no {want} within 30 s")
                if i:   # the first one includes meshd's first answer
                    took.append(time.monotonic() - written)
            took.sort()
            print(f"{len(took)} policy changes, write to the new decision: "
                  f"p50 {1000 * statistics.median(took):.0f} ms, "
                  f"p99 {1000 * took[min(len(took) - 1, int(len(took) * 0.99))]:.0f} ms, "
                  f"max {1000 * took[-1]:.0f} ms")
        finally:
            m.stop()
            app.stop()


if __name__ == "__main__":
    main()
