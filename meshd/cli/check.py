"""`meshd check -c FILE`: validate a config without running it; `meshd check --live`:
a preflight of a running meshd (``meshd.cli.check_live``)."""

from __future__ import annotations

import click

from meshd.cli.common import admin_address, fail_config
from meshd.errors import ConfigError
from meshd.validate import load_checked


@click.command()
@click.option("-c", "--config", "path", default=None,
              help="Config file (TOML). With --live: ask the admin address it names.")
@click.option("--live", is_flag=True,
              help="Check a running meshd through its admin API instead: workers, discovery, "
                   "shm rows, certificate, reloads. Exit 0 when every check passes, 1 if not.")
@click.option("--admin", default=None, help="With --live: the admin address "
              "[default: 127.0.0.1:4191, or the [admin] listen of -c FILE].")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="With --live: lines, or one JSON object.")
def check(path: str | None, live: bool, admin: str | None, output: str) -> None:
    """Validate a config: exit 0, or exit 2 with `FILE: key.path: problem` lines.
    With --live, check a running meshd instead: exit 0, or 1 if a check failed."""
    if live:
        from meshd.cli.check_live import run_live
        run_live(admin_address(admin, path), output)
        return
    if path is None:
        raise click.UsageError("Missing option '-c' / '--config' (a config to validate), or --live")
    if admin is not None:
        raise click.UsageError("--admin goes with --live")
    try:
        cfg = load_checked(path)
    except ConfigError as e:
        fail_config(e)
        return
    click.echo(f"{path}: ok ({len(cfg.listeners)} listeners, {len(cfg.discovery)} discovery "
               f"sources, {cfg.workers} workers)")
