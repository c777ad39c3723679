"""`meshd tap`: the requests a running meshd proxies, as they finish (admin ``/tap``),
one line each: a human line, a wider one, or the NDJSON objects themselves.

``open_tap`` and ``lines`` are shared with `meshd top` (``meshd.cli.top``), which builds
its table from the same stream. Every field a client of the mesh controls (authority,
path, method) is printed with control characters escaped: a request cannot write
terminal escape sequences to the operator's screen.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import click

from meshd.cli.common import DEFAULT_ADMIN

if TYPE_CHECKING:
    import http.client

MAX_LINE = 16 * 1024  # bytes of one NDJSON line read at most (a record is ~3 KB)

# C0 and C1 controls and DEL as \xNN: what a terminal would act on.
_ESCAPES = {i: f"\\x{i:02x}" for i in [*range(0x20), *range(0x7f, 0xa0)]}


def safe(value: object) -> str:
    """A field as printable text: control characters escaped."""
    return str(value).translate(_ESCAPES)


def tap_query(service: str | None, method: str | None, path_prefix: str | None,
              status: str | None, direction: str | None) -> str:
    params = {k: v for k, v in (("service", service), ("method", method),
                                ("path_prefix", path_prefix), ("status", status),
                                ("direction", direction)) if v}
    return "/tap" + ("?" + urlencode(params) if params else "")


def open_tap(admin: str, query: str, timeout: float | None = None
             ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Connect to admin ``/tap`` and return once its head arrived (the workers tap from
    then on). Raises click.ClickException with meshd's answer when it refuses."""
    import http.client  # here: it imports ssl, which the master must not

    host, _, port = admin.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", query)
        resp = conn.getresponse()
    except (OSError, http.client.HTTPException) as e:
        conn.close()
        raise click.ClickException(f"cannot tap the admin API at {admin}: {e}") from None
    if resp.status != 200:
        text = resp.read(4096).decode("utf-8", "replace").strip()
        conn.close()
        raise click.ClickException(f"{admin} refused the tap ({resp.status}): {safe(text)}")
    if conn.sock is not None:
        conn.sock.settimeout(timeout)
    return conn, resp


def lines(conn: http.client.HTTPConnection, resp: http.client.HTTPResponse,
          deadline: float | None = None) -> Iterator[dict[str, Any]]:
    """The stream's records until it ends (or ``deadline``, time.monotonic)."""
    while True:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if conn.sock is not None:
                conn.sock.settimeout(left)
        try:
            raw = resp.readline(MAX_LINE)
        except TimeoutError:
            return
        if not raw:
            raise EOFError("the tap stream ended (meshd stopped, or reloaded)")
        if not raw.endswith(b"\n"):
            continue  # a line longer than any record: not meshd's, skipped
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict):
            yield rec


def _ms(v: object) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    return f"{v:.0f}ms" if v >= 10 else f"{v:.2f}ms"


def human(rec: dict[str, Any], wide: bool = False) -> str:
    """``ts direction service METHOD authority path -> status [grpc=N] latency endpoint``
    (wide: the listener, tls, client identity and attempts too)."""
    grpc = f" grpc={safe(rec.get('grpc_status'))}" if rec.get("grpc_status") not in ("", None) else ""
    ep = rec.get("endpoint") or "-"
    text = (f"{safe(rec.get('ts', ''))} {safe(rec.get('direction', ''))} "
            f"{safe(rec.get('service') or '-')} {safe(rec.get('method', ''))} "
            f"{safe(rec.get('authority') or '-')} {safe(rec.get('path', ''))} -> "
            f"{safe(rec.get('status', ''))}{grpc} {_ms(rec.get('latency_ms'))} {safe(ep)}")
    if wide:
        text += (f" listener={safe(rec.get('listener', ''))} tls={str(rec.get('tls')).lower()}"
                 f" client_id={safe(rec.get('client_id') or '-')}"
                 f" attempts={safe(rec.get('attempts', 0))}")
    return text


@click.command()
@click.option("--admin", default=DEFAULT_ADMIN, show_default=True, help="Admin address.")
@click.option("--service", help="Only requests routed to this service.")
@click.option("--method", help="Only this request method (GET, POST...).")
@click.option("--path-prefix", help="Only paths that start with this.")
@click.option("--status", help="Only this response status: a code (404) or a class (5xx).")
@click.option("--direction", type=click.Choice(["inbound", "outbound"]),
              help="Only requests of this direction's listeners.")
@click.option("-o", "--output", type=click.Choice(["text", "wide", "json"]), default="text",
              show_default=True, help="A line per request, a wider one, or the NDJSON records.")
@click.option("--max", "max_count", type=click.IntRange(min=1),
              help="Stop after this many requests.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True),
              help="Stop after this many seconds.")
def tap(admin: str, service: str | None, method: str | None, path_prefix: str | None,
        status: str | None, direction: str | None, output: str, max_count: int | None,
        duration: float | None) -> None:
    """Stream the requests a running meshd proxies, like `linkerd viz tap` (Ctrl-C ends)."""
    deadline = time.monotonic() + duration if duration else None
    query = tap_query(service, method, path_prefix, status, direction)
    try:
        conn, resp = open_tap(admin, query, duration)
    except KeyboardInterrupt:   # Ctrl-C before the stream began: as quiet as after
        return
    count = 0
    try:
        for rec in lines(conn, resp, deadline):
            if output == "json":
                sys.stdout.write(json.dumps(rec, separators=(",", ":")) + "\n")
            else:
                sys.stdout.write(human(rec, output == "wide") + "\n")
            sys.stdout.flush()
            count += 1
            if max_count is not None and count >= max_count:
                break
    except EOFError as e:
        raise click.ClickException(str(e)) from None
    except (KeyboardInterrupt, BrokenPipeError):
        pass
    finally:
        resp.close()
        conn.close()
