"""A keep-alive load for tests of weighted splits: it counts which backend answered."""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter

from meshd.testing.harness import wait_for


class CountingLoad:
    """Keep-alive clients naming service web, counting which backend answered (and
    failures) since the last ``sample``. Each client stops by itself after 120 s."""

    def __init__(self, port: int, connections: int = 4) -> None:
        self.port = port
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []
        self.total_ok = 0
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True)
                        for _ in range(connections)]

    def start(self) -> CountingLoad:
        for t in self.threads:
            t.start()
        return self

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        deadline = time.monotonic() + 120
        while not self.stop_event.is_set() and time.monotonic() < deadline:
            try:
                conn.request("GET", "/", headers={"Host": "web"})
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"status {resp.status}")
                with self.lock:
                    self.counts[resp.getheader("x-backend") or "?"] += 1
                    self.total_ok += 1
            except Exception as e:
                with self.lock:
                    self.failures.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.close()

    def sample(self, n: int, timeout: float = 60.0) -> Counter[str]:
        with self.lock:
            self.counts = Counter()
        wait_for(lambda: sum(self.counts.values()) >= n, timeout, interval=0.01,
                 what=f"{n} requests")
        with self.lock:
            return Counter(self.counts)

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(15)
