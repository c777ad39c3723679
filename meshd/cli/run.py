"""`meshd run -c FILE`: the master in the foreground, logging to stderr."""

from __future__ import annotations

import logging
import sys

import click

from meshd.cli.common import fail_config, load_checked
from meshd.errors import ConfigError

LOG_FORMAT = "%(asctime)s %(levelname)s meshd[%(process)d] %(name)s: %(message)s"


@click.command()
@click.option("-c", "--config", "path", required=True, help="Config file (TOML).")
@click.option("--workers", type=click.IntRange(1, 128), default=None,
              help="Worker processes (overrides the config's `workers`).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
def run(path: str, workers: int | None, log_level: str) -> None:
    """Run meshd in the foreground (exit 0 after a graceful stop)."""
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    try:
        cfg = load_checked(path, tolerate_broken_plugins=True)
    except ConfigError as e:
        fail_config(e)
        return
    from meshd.master.arbiter import Arbiter

    sys.exit(Arbiter(cfg, workers).run())
