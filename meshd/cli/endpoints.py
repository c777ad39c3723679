"""`meshd endpoints`: each endpoint's balancing state, from the admin API's /endpoints;
with ``--why``, the last balancer decisions (/debug/decisions, ``meshd.cli.why``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import click

from meshd.cli.common import admin_address, admin_get, echo_table
from meshd.cli.why import WHY_HEADER, why_rows

__all__ = ["HEADER", "WHY_HEADER", "endpoints"]

HEADER = ("SERVICE", "ENDPOINT", "STATE", "INFLIGHT", "EWMA", "SUCCESS(10s)", "RPS(10s)",
          "EJECTED-UNTIL", "FAILURES", "IDENTITY")


def _ms(v: object) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    return f"{v:.0f}ms" if v >= 10 else f"{v:.2f}ms"


def _show(v: object, fmt: str = "{}") -> str:
    return "-" if v is None else fmt.format(v)


def _address_key(address: str) -> tuple[str, int, str]:
    """Sort by host, then by port as a number ("x:9000" before "x:10000")."""
    host, _, port = address.rpartition(":")
    return (host, int(port), "") if port.isdigit() else (address, 0, address)


def _row(service: str, e: Mapping[str, Any]) -> tuple[str, ...]:
    sr = e.get("success_rate_10s")
    return (
        service, str(e.get("address", "?")), str(e.get("state", "-")),
        _show(e.get("in_flight")), _ms(e.get("ewma_ms")),
        "-" if sr is None else f"{sr * 100:.1f}%",
        _show(e.get("rps_10s"), "{:.1f}"), _show(e.get("ejected_until")),
        _show(e.get("failures")),
        # The SPIFFE ID a meshed endpoint must present (mTLS once [identity] is set);
        # "-": not meshed, or meshed without an identity (plaintext h2c).
        str(e.get("identity") or "-"),
    )


@click.command()
@click.option("--admin", metavar="HOST:PORT", default=None,
              help="Admin address [default: 127.0.0.1:4191].")
@click.option("-c", "--config", "config_path", metavar="FILE", default=None,
              help="Ask the admin API of the meshd running FILE (its [admin] listen).")
@click.option("--service", metavar="NAME", default=None, help="Only this service's endpoints.")
@click.option("--json", "as_json", is_flag=True, help="Print the /endpoints JSON instead.")
@click.option("--why", metavar="[SERVICE]", is_flag=False, flag_value="", default=None,
              help="The last balancer decisions instead (of SERVICE, or --service, or all).")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True,
              help="With --why: how many decisions.")
def endpoints(admin: str | None, config_path: str | None, service: str | None,
              as_json: bool, why: str | None, limit: int) -> None:
    """Each endpoint's balancing state: in-flight requests, latency EWMA, success rate and
    requests/s over about the last 10 s, when an ejection ends (UTC), failures in total,
    and the identity (SPIFFE ID) discovery expects a meshed endpoint to present.

    With --why: the last balancer decisions, newest first: the worker, the route, the
    attempt, the two candidates P2C compared (address cost/in-flight, and the state
    unless healthy), the pick, the endpoints skipped as ejected, the status and
    latency, and whether a retry followed (and why not, for a failure)."""
    if why is not None:
        decided = why_rows(admin_address(admin, config_path), why or service, limit, as_json)
        if decided is not None:
            echo_table(decided)
        return
    data = admin_get(admin_address(admin, config_path), "/endpoints")
    services = data.get("services") if isinstance(data, dict) else None
    if not isinstance(services, dict):
        raise click.ClickException("the admin API answered /endpoints without a services map")
    if service is not None:
        if service not in services:
            watched = ", ".join(sorted(services)) or "none"
            raise click.ClickException(f"no watched service {service!r} (watched: {watched})")
        services = {service: services[service]}
        data = {**data, "services": services}
    if as_json:
        click.echo(json.dumps(data, indent=1))
        return
    rows: list[tuple[str, ...]] = [HEADER]
    for name in sorted(services):
        eps = services[name].get("endpoints") or []
        for e in sorted(eps, key=lambda e: _address_key(str(e.get("address", "")))):
            rows.append(_row(name, e))
    echo_table(rows)
