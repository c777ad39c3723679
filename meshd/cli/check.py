"""`meshd check -c FILE`: validate a config without running it."""

from __future__ import annotations

import click

from meshd.cli.common import fail_config
from meshd.errors import ConfigError
from meshd.validate import load_checked


@click.command()
@click.option("-c", "--config", "path", required=True, help="Config file (TOML).")
def check(path: str) -> None:
    """Validate a config: exit 0, or exit 2 with `FILE: key.path: problem` lines."""
    try:
        cfg = load_checked(path)
    except ConfigError as e:
        fail_config(e)
        return
    click.echo(f"{path}: ok ({len(cfg.listeners)} listeners, {len(cfg.discovery)} discovery "
               f"sources, {cfg.workers} workers)")
