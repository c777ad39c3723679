"""What the subcommands share: config errors on the terminal, admin requests and the
admin address, tables. (Loading a config with plugin validation: ``meshd.validate``.)"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click

from meshd import config as config_mod
from meshd.errors import ConfigError

EXIT_USAGE = 2


def fail_config(err: ConfigError) -> None:
    for line in err.lines():
        click.echo(line, err=True)
    raise SystemExit(EXIT_USAGE)


def admin_get(admin: str, path: str) -> Any:
    # Imported here: they import ssl, which the master (importing this module) must not.
    import http.client
    import urllib.error
    import urllib.request

    url = f"http://{admin}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        # ValueError: not JSON; HTTPException: not HTTP
        raise click.ClickException(f"cannot reach the admin API at {url}: {e}") from None


DEFAULT_ADMIN = "127.0.0.1:4191"


def admin_address(admin: str | None, config_path: str | None) -> str:
    """The admin API address to ask: ``--admin``, else the ``[admin] listen`` of the config
    at ``config_path`` (a wildcard host is asked on loopback), else the default. A config
    that does not load exits 2 with its problems."""
    if admin and config_path:
        raise click.UsageError("give --admin or --config, not both")
    if admin:
        return admin
    if not config_path:
        return DEFAULT_ADMIN
    try:
        listen = config_mod.load(config_path).admin.listen
    except ConfigError as e:
        fail_config(e)
        raise
    if listen.port == 0:
        raise click.ClickException(f"{config_path}: the admin API listens on a port the kernel "
                                   "picks (port 0); give --admin HOST:PORT")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen.host, listen.host)
    return f"[{host}]:{listen.port}" if ":" in host else f"{host}:{listen.port}"


def echo_table(rows: Sequence[Sequence[str]]) -> None:
    """Rows (the first is the header) as left-aligned columns two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
