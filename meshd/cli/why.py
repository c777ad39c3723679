"""`meshd endpoints --why [SERVICE]`: the last balancer decisions as a table, from the
admin API's /debug/decisions (``meshd.control.decisions``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

import click

from meshd.cli.common import admin_get

MAX_SERVICE = 253   # what /debug/decisions accepts (meshd.control.decisions)

WHY_HEADER = ("TIME", "WORKER", "SERVICE", "ROUTE", "TRY", "BALANCER", "CANDIDATES", "PICK",
              "EJECTED", "STATUS", "LATENCY", "RETRY")


def _ms(v: object) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    return f"{v:.0f}ms" if v >= 10 else f"{v:.2f}ms"


def _candidate(c: Mapping[str, Any]) -> str:
    """``address cost/in-flight``, and the state unless healthy."""
    text = f"{c.get('endpoint', '?')}={_ms(c.get('cost_ms'))}/{c.get('in_flight', '?')}"
    state = c.get("state")
    return text if state in (None, "healthy") else f"{text}({state})"


def _retry(d: Mapping[str, Any]) -> str:
    what = d.get("status") or d.get("outcome") or "-"
    if d.get("retried"):
        return f"retried({d.get('outcome')}:{what})"
    if d.get("no_retry"):
        return f"no:{d['no_retry']}"
    return "-"


def _row(d: Mapping[str, Any]) -> tuple[str, ...]:
    worker = d.get("worker") or {}
    cands = d.get("candidates") or []
    ejected = d.get("ejected_endpoints") or []
    more = (d.get("ejected") or 0) - len(ejected)
    pick = str(d.get("pick", "?"))
    if d.get("pick_state") not in (None, "healthy"):
        pick += f"({d['pick_state']})"
    status = str(d.get("status") or d.get("outcome") or "-")
    if d.get("error"):
        status += f"({d['error']})"
    return (
        str(d.get("time", "?"))[11:23], f"{worker.get('slot', '?')}/{worker.get('pid', '?')}",
        str(d.get("service") or "-"), str(d.get("route") or "-"), str(d.get("attempt", "?")),
        str(d.get("balancer", "?")), ",".join(_candidate(c) for c in cands) or "-", pick,
        (",".join(ejected) + (f"+{more}" if more > 0 else "")) or "-",
        status.replace(" ", "_"), _ms(d.get("latency_ms")), _retry(d),
    )


def why_rows(admin: str, service: str | None, limit: int,
             as_json: bool) -> list[tuple[str, ...]] | None:
    """The table's rows, header first; None when the JSON was printed instead."""
    query = {"limit": str(limit)}
    if service:
        if len(service) > MAX_SERVICE or not service.isprintable():
            raise click.ClickException(f"a service name has at most {MAX_SERVICE} printable "
                                       "characters")
        query["service"] = service
    data = admin_get(admin, "/debug/decisions?" + urlencode(query))
    found = data.get("decisions") if isinstance(data, dict) else None
    if not isinstance(found, list):
        raise click.ClickException("the admin API answered /debug/decisions without a "
                                   "decisions list")
    if as_json:
        click.echo(json.dumps(data, indent=1))
        return None
    return [WHY_HEADER, *(_row(d) for d in found if isinstance(d, dict))]
