"""`meshd top`: a live table of the busiest paths, built from the tap stream on the
client side (as `linkerd viz top` does): one row per method, authority and path (the
query string left out, so that ids in it do not make a row each), with its count,
success rate, p50 and p99 latency and requests per second; redrawn in place each
REFRESH seconds with curses; ``q`` quits.

``Paths`` is the table (no I/O): bounded in rows (MAX_ROWS, the least recently seen
row evicted) and in samples per row (the last LATENCY_SAMPLES latencies, the arrivals of
the last RATE_WINDOW seconds). A thread reads the tap stream into it; the main thread
draws. Success is Linkerd's: not a 5xx, and a gRPC status of 0 when there is one.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import click

from meshd.cli.common import DEFAULT_ADMIN
from meshd.cli.tap import lines, open_tap, safe, tap_query

MAX_ROWS = 2000          # paths kept at most
LATENCY_SAMPLES = 1000   # latencies kept per path (the quantiles are of these)
RATE_WINDOW = 10.0       # seconds the requests/s column covers
REFRESH = 1.0            # seconds between redraws
HEADER = ("METHOD", "AUTHORITY", "PATH", "COUNT", "SUCCESS", "RPS", "P50", "P99")


@dataclass
class PathStats:
    count: int = 0
    successes: int = 0
    latencies: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=LATENCY_SAMPLES))
    arrivals: collections.deque[float] = field(default_factory=collections.deque)

    def rps(self, now: float, since: float) -> float:
        while self.arrivals and self.arrivals[0] < now - RATE_WINDOW:
            self.arrivals.popleft()
        span = min(RATE_WINDOW, max(now - since, 1.0))
        return len(self.arrivals) / span


def success(rec: dict[str, Any]) -> bool:
    status = rec.get("status")
    grpc = rec.get("grpc_status")
    if not isinstance(status, int) or status >= 500 or status == 0:
        return False
    return grpc in ("", None, "0")


def quantile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


class Paths:
    def __init__(self) -> None:
        self.rows: collections.OrderedDict[tuple[str, str, str], PathStats] = \
            collections.OrderedDict()
        self.started = time.monotonic()
        self.total = 0
        self.lock = threading.Lock()

    def add(self, rec: dict[str, Any], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        path = str(rec.get("path", "")).split("?", 1)[0]
        key = (str(rec.get("method", "")), str(rec.get("authority", "")), path)
        with self.lock:
            stats = self.rows.get(key)
            if stats is None:
                if len(self.rows) >= MAX_ROWS:
                    self.rows.popitem(last=False)
                stats = self.rows[key] = PathStats()
            else:
                self.rows.move_to_end(key)
            stats.count += 1
            stats.successes += success(rec)
            latency = rec.get("latency_ms")
            if isinstance(latency, (int, float)):
                stats.latencies.append(float(latency))
            stats.arrivals.append(now)
            if len(stats.arrivals) > 100_000:
                stats.arrivals.popleft()
            self.total += 1

    def table(self, limit: int, now: float | None = None) -> list[tuple[str, ...]]:
        """The header and the ``limit`` busiest paths, by count."""
        now = time.monotonic() if now is None else now
        with self.lock:
            busiest = sorted(self.rows.items(), key=lambda kv: -kv[1].count)[:limit]
            out: list[tuple[str, ...]] = [HEADER]
            for (method, authority, path), s in busiest:
                lat = sorted(s.latencies)
                out.append((safe(method), safe(authority), safe(path), str(s.count),
                            f"{100 * s.successes / s.count:.2f}%", f"{s.rps(now, self.started):.1f}",
                            _ms(quantile(lat, 0.5)), _ms(quantile(lat, 0.99))))
        return out


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}ms" if v >= 10 else f"{v:.2f}ms"


def render(rows: list[tuple[str, ...]], width: int) -> list[str]:
    """Rows as columns, each line cut to ``width`` (the path column takes what is left)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    widths[1] = min(widths[1], 32)
    fixed = sum(w for i, w in enumerate(widths) if i != 2) + 2 * (len(HEADER) - 1)
    widths[2] = max(8, min(widths[2], width - fixed))
    out = []
    for r in rows:
        cells = [c if len(c) <= w else c[:max(w - 1, 0)] + "~"
                 for c, w in zip(r, widths, strict=True)]
        out.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))[:width])
    return out


class _Reader(threading.Thread):
    def __init__(self, admin: str, query: str, paths: Paths) -> None:
        super().__init__(daemon=True)
        self.conn, self.resp = open_tap(admin, query)
        self.paths = paths
        self.error = ""

    def run(self) -> None:
        try:
            for rec in lines(self.conn, self.resp):
                self.paths.add(rec)
        except (EOFError, OSError) as e:
            self.error = str(e)


def _draw(screen: Any, paths: Paths, reader: _Reader, admin: str, query: str) -> None:
    height, width = screen.getmaxyx()
    screen.erase()
    title = (f"meshd top  {safe(admin)}{safe(query[4:])}  {paths.total} requests  "
             f"(q quits)")
    screen.addnstr(0, 0, title, width - 1)
    if reader.error:
        screen.addnstr(1, 0, f"tap: {safe(reader.error)}", width - 1)
    for i, line in enumerate(render(paths.table(max(height - 4, 1)), width - 1)):
        if 2 + i >= height:
            break
        screen.addnstr(2 + i, 0, line, width - 1)
    screen.refresh()


def _loop(screen: Any, paths: Paths, reader: _Reader, admin: str, query: str) -> None:
    import curses

    try:
        curses.curs_set(0)
    except curses.error:
        pass
    screen.timeout(int(REFRESH * 1000))
    while True:
        _draw(screen, paths, reader, admin, query)
        key = screen.getch()
        if key in (ord("q"), ord("Q")):
            return


@click.command()
@click.option("--admin", default=DEFAULT_ADMIN, show_default=True, help="Admin address.")
@click.option("--service", help="Only requests routed to this service.")
@click.option("--direction", type=click.Choice(["inbound", "outbound"]),
              help="Only requests of this direction's listeners.")
def top(admin: str, service: str | None, direction: str | None) -> None:
    """A live table of the busiest paths, like `linkerd viz top` (q quits)."""
    import curses

    query = tap_query(service, None, None, None, direction)
    paths = Paths()
    reader = _Reader(admin, query, paths)
    reader.start()
    try:
        curses.wrapper(_loop, paths, reader, admin, query)
    except KeyboardInterrupt:
        pass
    finally:
        reader.conn.close()
