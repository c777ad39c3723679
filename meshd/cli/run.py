"""`meshd run -c FILE`: the master in the foreground, logging to stderr."""

from __future__ import annotations

import sys

import click

from meshd import logs
from meshd.cli.common import fail_config
from meshd.errors import ConfigError
from meshd.validate import load_checked


@click.command()
@click.option("-c", "--config", "path", required=True, help="Config file (TOML).")
@click.option("--workers", type=click.IntRange(1, 128), default=None,
              help="Worker processes (overrides the config's `workers`).")
@click.option("--log-level", type=click.Choice(logs.LEVELS), default=None,
              help="Overrides the config's `log_level` (default info), also across reloads.")
@click.option("--log-format", type=click.Choice(logs.FORMATS), default="text", show_default=True,
              help="json: one object per line (ts, level, logger, msg, pid). Text has no "
                   "timestamp when stderr is the systemd journal.")
def run(path: str, workers: int | None, log_level: str | None, log_format: str) -> None:
    """Run meshd in the foreground (exit 0 after a graceful stop)."""
    logs.setup(log_format, log_level or "info")
    try:
        cfg = load_checked(path, isolated=True)
    except ConfigError as e:
        fail_config(e)
        return
    if log_level is None:
        logs.set_level(cfg.log_level)
    from meshd.master.arbiter import Arbiter

    sys.exit(Arbiter(cfg, workers, log_level_override=log_level).run())
