"""Scrapes each meshd's admin /metrics every second and finds counters that went
backwards: a sample of a ``# TYPE ... counter`` family (per name and label set) lower than
the last value scraped. A failed scrape (the control process serves the admin endpoint:
it may be the fault) is counted, not an error."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from meshd.testing.harness import http_get


@dataclass
class Backwards:
    mesh: str
    t: float
    sample: str
    before: float
    after: float
    before_t: float          # when ``before`` was scraped: a sample that vanished (a new
                             # region without that row yet) and came back lower is a reset too


@dataclass
class Scraper:
    name: str
    port: int
    interval: float = 1.0
    scrapes: int = 0
    failed: int = 0
    backwards: list[Backwards] = field(default_factory=list)
    last: dict[str, tuple[float, float]] = field(default_factory=dict)   # value, when
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Scraper:
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"scrape-{self.name}")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.scrape_once()

    def scrape_once(self) -> None:
        try:
            status, _, body = http_get("127.0.0.1", self.port, "/metrics", timeout=3)
        except OSError:
            self.failed += 1
            return
        if status != 200:
            self.failed += 1
            return
        self.scrapes += 1
        now = time.monotonic()
        for sample, value in counter_samples(body.decode("utf-8", "replace")).items():
            before = self.last.get(sample)
            if before is not None and value < before[0] and len(self.backwards) < 1000:
                self.backwards.append(Backwards(self.name, now, sample, before[0], value,
                                                before[1]))
            self.last[sample] = (value, now)


def counter_samples(text: str) -> dict[str, float]:
    """{'name{labels}': value} of every sample of a counter family in ``text``."""
    counters: set[str] = set()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) >= 4 and parts[3] == "counter":
                counters.add(parts[2])
            continue
        if not line or line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        name = sample.split("{", 1)[0]
        family = name.removesuffix("_total")
        if name in counters or family in counters:
            try:
                out[sample] = float(value)
            except ValueError:
                continue
    return out
