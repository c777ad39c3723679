"""`meshd stat`: per service success rate, requests/s and latency quantiles."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import click

from meshd import config as config_mod
from meshd.cli.common import admin_get, fail_config
from meshd.errors import ConfigError, ShmError
from meshd.metrics import StatWindow, row_keys
from meshd.private_files import reader_uid
from meshd.shm import OFF_GENERATION, OFF_MASTER_PID, Region, region_path
from meshd.snapshot import read as read_snapshot
from meshd.snapshot import snapshot_path


def _ms(v: object) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    return f"{v:.0f}ms" if v >= 10 else f"{v:.2f}ms"


@click.command()
@click.option("--admin", default="127.0.0.1:4191", show_default=True, help="Admin address.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
@click.option("--shm", "config_path", metavar="CONFIG", default=None,
              help="Read the shared memory of the meshd running CONFIG (read-only, no admin "
                   "API needed): totals since it started, no rates.")
def stat(admin: str, output: str, config_path: str | None) -> None:
    """Golden metrics per service, like `linkerd viz stat`."""
    data = _from_shm(config_path) if config_path else admin_get(admin, "/stats")
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


def _from_shm(config_path: str) -> dict[str, Any]:
    try:
        cfg = config_mod.load(config_path)
    except ConfigError as e:
        fail_config(e)
        raise
    try:
        # Only files meshd wrote are read: this uid's, or (for root) the owner's of a
        # shm_dir no one else can write (meshd.private_files).
        uid = reader_uid(cfg.shm_dir)
        region = Region.attach(region_path(cfg.shm_dir, cfg.instance), uid=uid)
    except (OSError, ShmError) as e:
        raise click.ClickException(str(e)) from None
    try:
        master = region.get_u32(OFF_MASTER_PID)
        generation = region.get_u64(OFF_GENERATION)
        rows: Mapping[str, Mapping[str, int]] = {}
        for gen in (generation, generation - 1):  # the newest may still be booting
            try:
                rows = read_snapshot(snapshot_path(cfg.shm_dir, cfg.instance, master, gen),
                                     uid).rows
                break
            except (OSError, ValueError):
                continue
        window = StatWindow()
        keys = row_keys(cfg, rows)
        window.take(region, sorted(keys))
        return {"generation": generation, "rows": window.figures(keys)}
    finally:
        region.close()
