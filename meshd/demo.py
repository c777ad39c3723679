"""`make demo`: a small mesh on loopback, traffic through it, its figures, and a clean stop.

Starts two demo backends for service "web", meshd with config/demo.toml (static
discovery, 2 workers), sends requests through the outbound listener (and a few to a
service nobody knows, to show a failure), prints `meshd stat`, then stops everything.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from meshd.testing.harness import Backend, Meshd, http_get, port_open

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config" / "demo.toml"
OUTBOUND, INBOUND, ADMIN = 14140, 14143, 14191
BACKENDS = (("web-a", 18081), ("web-b", 18082))


def main() -> int:
    busy = [p for p in (OUTBOUND, INBOUND, ADMIN, *(p for _, p in BACKENDS)) if port_open("127.0.0.1", p)]
    if busy:
        print(f"demo: ports {busy} are in use on 127.0.0.1; stop what holds them", file=sys.stderr)
        return 1
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"meshd-demo-{os.getpid()}.log"
    backends = [Backend(name, port) for name, port in BACKENDS]
    meshd = Meshd(CONFIG, log_path, admin=f"127.0.0.1:{ADMIN}", instance="demo")
    try:
        for b in backends:
            b.start()
        print(f"$ meshd run -c {CONFIG.relative_to(ROOT)}   (log: {log_path})")
        meshd.start()
        print(f"meshd is ready: master pid {meshd.pid}, workers {meshd.worker_pids()}\n")

        print(f"$ curl -H 'Host: web' http://127.0.0.1:{OUTBOUND}/hello")
        status, headers, body = http_get("127.0.0.1", OUTBOUND, "/hello", {"Host": "web"})
        print(f"{status} from {headers.get('x-backend')}: {body.decode().strip()}\n")

        answered: Counter[str] = Counter()
        started = time.monotonic()
        for i in range(400):
            status, headers, _ = http_get("127.0.0.1", OUTBOUND, f"/item/{i}", {"Host": "web"})
            answered[f"{status} {headers.get('x-backend', '')}".strip()] += 1
        for _ in range(8):
            status, headers, body = http_get("127.0.0.1", OUTBOUND, "/", {"Host": "billing"})
            answered[f"{status} ({body.decode().strip()})"] += 1
        for i in range(40):
            status, _, _ = http_get("127.0.0.1", INBOUND, f"/in/{i}")
            answered[f"{status} via inbound"] += 1
        took = time.monotonic() - started
        print(f"sent {sum(answered.values())} requests in {took:.1f}s:")
        for outcome, n in sorted(answered.items()):
            print(f"  {n:4d} x {outcome}")

        print(f"\n$ meshd stat --admin 127.0.0.1:{ADMIN}")
        time.sleep(1.1)
        out = subprocess.run([sys.executable, "-m", "meshd", "stat", "--admin", f"127.0.0.1:{ADMIN}"],
                             capture_output=True, text=True, timeout=20)
        print(out.stdout or out.stderr)

        print(f"$ kill -TERM {meshd.pid}")
        meshd.signal(signal.SIGTERM)
        code = meshd.wait(30)
        print(f"meshd exited with {code}")
        return 0 if code == 0 else 1
    finally:
        meshd.stop()
        for b in backends:
            b.stop()


if __name__ == "__main__":
    sys.exit(main())
