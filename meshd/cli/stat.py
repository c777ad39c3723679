"""`meshd stat`: per service success rate, requests/s and latency quantiles."""

from __future__ import annotations

import json

import click

from meshd.cli.common import admin_get


def _ms(v: object) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    return f"{v:.0f}ms" if v >= 10 else f"{v:.2f}ms"


@click.command()
@click.option("--admin", default="127.0.0.1:4191", show_default=True, help="Admin address.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
def stat(admin: str, output: str) -> None:
    """Golden metrics per service, like `linkerd viz stat`."""
    data = admin_get(admin, "/stats")
    if output == "json":
        click.echo(json.dumps(data, indent=1))
        return
    rows = [("DIRECTION", "LISTENER", "SERVICE", "SUCCESS", "RPS", "P50", "P95", "P99", "REQUESTS")]
    for r in data["rows"]:
        sr = r["success_rate"]
        rows.append((
            r["direction"], r["listener"], r["service"],
            "-" if sr is None else f"{sr * 100:.2f}%",
            f"{r['rps']:.1f}", _ms(r["latency_ms_p50"]), _ms(r["latency_ms_p95"]),
            _ms(r["latency_ms_p99"]), str(r["requests_total"]),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
