"""`meshd check --live [--admin ADDR] [-o table|json]`: a preflight of a running meshd
through its admin API, like `linkerd check --proxy`.

One line per check, ``✔`` pass, ``‼`` warning, ``×`` failure; exit 0 unless a check
failed (warnings do not fail), 1 otherwise. The checks, in order:

- the admin API answers (``/live``); if not, the rest are skipped (and counted failed);
- ``/ready`` is 200 (else its own words on what it waits for);
- every desired worker serves (``/status`` ``workers``);
- each discovery source answered every service it watches, and no watch fails now;
- the shared-memory rows: none exhausted (a failure: traffic is counted under
  ``_overflow``, endpoints run without health rows); over 3/4 in use is a warning (the
  region grows at the next reload);
- with ``[identity]``: a workload certificate is published and valid; a warning when
  less than CERT_WARN (24 h) *and* less than CERT_WARN_FRACTION (a quarter) of its
  lifetime is left: a certificate renewed on time (meshd-ca renews at 2/3 of it) never
  warns, a long-lived one warns on its last day, a short-lived one when renewal is late;
- config reloads: none failed since this generation started (a successful reload starts a
  new generation, so a failure counted since means the file's config is not running).

:func:`evaluate` is the logic over what the admin API answered (plain values, tested
without a meshd); the command only fetches and prints.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import click

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"
MARK = {PASS: "✔", WARN: "‼", FAIL: "×", SKIP: "-"}
CERT_WARN = 24 * 3600.0
CERT_WARN_FRACTION = 0.25
TIMEOUT = 5.0
BODY_MAX = 4 << 20   # bytes read of one admin answer
NAMES = 5            # service names quoted in a line; the rest are counted

Fetch = Callable[[str], tuple[int, bytes]]   # path -> (HTTP status, body); OSError if down


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    result: str   # PASS | WARN | FAIL | SKIP
    detail: str


def evaluate(fetch: Fetch) -> list[Check]:
    """Every check's result, from the admin API ``fetch`` reaches."""
    try:
        live_status, body = fetch("/live")
    except OSError as e:
        return [Check("admin API reachable", FAIL, f"cannot connect: {e}"),
                *(Check(name, SKIP, "admin API unreachable") for name in _LATER)]
    if live_status != 200:
        return [Check("admin API reachable", FAIL, f"/live answered {live_status}: "
                      f"{_text(body)}"), *(Check(n, SKIP, "master gone") for n in _LATER)]
    checks = [Check("admin API reachable", PASS, "/live 200")]
    try:
        ready_status, ready_body = fetch("/ready")
        status_code, status_body = fetch("/status")
        status = json.loads(status_body) if status_code == 200 else None
        identity_status, identity_body = fetch("/identity")
    except (OSError, ValueError) as e:
        return [*checks, Check("admin API answers", FAIL, str(e))]
    if status is None:
        return [*checks, Check("admin API answers", FAIL,
                               f"/status answered {status_code}: {_text(status_body)} "
                               "(a meshd older than `check --live`?)")]
    checks.append(Check("meshd ready", PASS, "/ready 200") if ready_status == 200 else
                  Check("meshd ready", FAIL, f"/ready {ready_status}: {_text(ready_body)}"))
    w = status["workers"]
    checks.append(Check("workers up", PASS if w["serving"] >= w["desired"] else FAIL,
                        f"{w['serving']} of {w['desired']} serving"
                        + (f", {w['restarts_total']} restarted since start"
                           if w["restarts_total"] else "")))
    checks += _sources(status["discovery"])
    checks.append(_rows(status["rows"]))
    checks.append(_identity(status.get("identity"), identity_status))
    checks.append(_reloads(status["reloads"], status["generation"]))
    return checks


_LATER = ("meshd ready", "workers up", "discovery sources synced", "shm rows",
          "workload certificate", "config reloads")


def _text(body: bytes) -> str:
    return body.decode("utf-8", "replace").strip()[:500]


def _names(names: list[Any], total: int) -> str:
    shown = ", ".join(str(n) for n in names[:NAMES])
    return shown + (f" and {total - min(total, NAMES)} more" if total > NAMES else "")


def _sources(discovery: dict[str, Any]) -> list[Check]:
    out = []
    for name, s in discovery.items():
        label = f"discovery source {name} ({s['plugin']})"
        problems = []
        if s["error"]:
            problems.append(f"cannot start: {s['error']}")
        if s["pending_total"]:
            problems.append(f"{s['pending_total']} of {s['services']} services without a "
                            f"first answer: {_names(s['pending'], s['pending_total'])}")
        if s["failing_total"]:
            first = s["failing"][0]
            n = s["failing_total"]
            problems.append(f"{n} watch{'es' if n != 1 else ''} failing "
                            f"({_names([f['service'] for f in s['failing']], n)}): "
                            f"{first['error']}")
        if problems:
            out.append(Check(label, FAIL, "; ".join(problems)))
        else:
            stale = f", {s['stale']} from the persisted state" if s["stale"] else ""
            out.append(Check(label, PASS, f"{s['synced']} of {s['services']} services synced"
                             + stale if s["services"] else "watches no service"))
    return out or [Check("discovery sources synced", PASS, "no discovery source")]


def _rows(rows: dict[str, Any]) -> Check:
    metric, endpoint = rows["metric"], rows["endpoint"]
    used = (f"metric rows {metric['in_use']}/{metric['capacity']}, endpoint rows "
            f"{endpoint['in_use']}/{endpoint['capacity']}")
    if rows["exhausted_total"]:
        return Check("shm rows", FAIL, f"{rows['exhausted_total']} pairs or endpoints found no "
                     f"row ({used}); reload (HUP) to grow the region")
    if any(4 * t["in_use"] > 3 * t["capacity"] for t in (metric, endpoint)):
        return Check("shm rows", WARN, f"over 3/4 in use ({used}); the region grows at the "
                     "next reload")
    return Check("shm rows", PASS, used)


def _identity(identity: dict[str, Any] | None, identity_status: int) -> Check:
    name = "workload certificate"
    if identity is None:
        return Check(name, SKIP, "no [identity] in the config" if identity_status == 404
                     else f"/identity answered {identity_status}")
    left = identity.get("expires_in_s")
    if left is None:
        return Check(name, FAIL, f"none published ({identity.get('error') or 'no material yet'})")
    who = identity.get("local_id") or "?"
    if left <= 0:
        return Check(name, FAIL, f"{who} expired {_duration(-left)} ago ({identity['not_after']})")
    lifetime = identity.get("lifetime_s") or left
    detail = f"{who} valid for {_duration(left)}, until {identity['not_after']}"
    if left < CERT_WARN and left < CERT_WARN_FRACTION * lifetime:
        return Check(name, WARN, detail + f" (of a {_duration(lifetime)} lifetime): not renewed")
    return Check(name, PASS, detail)


def _reloads(reloads: dict[str, Any], generation: int) -> Check:
    failed = reloads["failed_since_start"]
    totals = f"{reloads['success_total']} succeeded, {reloads['failure_total']} failed in all"
    if failed:
        return Check("config reloads", FAIL, f"the last reload failed ({failed} since generation "
                     f"{generation} started; {totals}); the config file is not the one running: "
                     "see the log, or `meshd check -c FILE`")
    return Check("config reloads", PASS, f"none failed since generation {generation} started "
                 f"({totals})")


def _duration(s: float) -> str:
    s = int(s)
    if s >= 86400:
        return f"{s // 86400}d {s % 86400 // 3600}h"
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 60}m {s % 60}s" if s >= 60 else f"{s}s"


def http_fetch(admin: str) -> Fetch:
    """GETs of the admin API at ``admin`` (``host:port``, ``[v6]:port``), any status."""
    import http.client  # here: it imports ssl, which the master must not

    host, _, port = admin.rpartition(":")
    host = host.strip("[]")

    def fetch(path: str) -> tuple[int, bytes]:
        try:
            conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
        except ValueError as e:
            raise OSError(f"bad admin address {admin!r}: {e}") from None
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read(BODY_MAX)
        except http.client.HTTPException as e:
            raise OSError(f"not an HTTP answer from {admin}: {e!r}") from None
        finally:
            conn.close()
    return fetch


def run_live(admin: str, output: str) -> None:
    checks = evaluate(http_fetch(admin))
    failed = [c for c in checks if c.result == FAIL]
    ok = not failed
    if output == "json":
        click.echo(json.dumps({"admin": admin, "ok": ok,
                               "checks": [asdict(c) for c in checks]}, indent=1))
    else:
        click.echo(f"meshd at {admin}")
        for c in checks:
            click.echo(f"{MARK[c.result]} {c.name}: {c.detail}")
        warned = sum(1 for c in checks if c.result == WARN)
        click.echo("")
        if ok:
            click.echo("Status check results are ✔" + (f" ({warned} warnings)" if warned else ""))
        else:
            click.echo(f"Status check results are × ({len(failed)} failed)")
    raise SystemExit(0 if ok else 1)
