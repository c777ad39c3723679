"""What the subcommands share: loading a config with plugin validation, admin requests
and the admin address, tables."""

from __future__ import annotations

import http.client
import json
import tomllib
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import click

from meshd import config as config_mod
from meshd.config import Config
from meshd.config_env import expand_env
from meshd.discovery.registry import load as load_plugin
from meshd.errors import ConfigError, PluginError

EXIT_USAGE = 2


def load_checked(path: str) -> Config:
    """The config at ``path``, with every discovery source's own keys validated by its
    plugin, even when the rest of the config has problems too: every problem is reported
    at once. Raises ConfigError. `check`, `run` and a reload (HUP) all load through here,
    so they accept and refuse the same configs (a plugin that fails to import included)."""
    cfg: Config | None = None
    problems: list[tuple[str, str]] = []
    try:
        loaded = config_mod.load(path)
        sources = [(src.plugin, src.name, dict(src.options)) for src in loaded.discovery]
        cfg = loaded
    except ConfigError as e:
        problems = list(e.problems)
        sources = _raw_sources(path)
    for i, (plugin, name, options) in enumerate(sources):
        try:
            cls, _info = load_plugin(plugin)
            cls(name, options)
        except PluginError as e:
            problems.append((f"discovery[{i}].plugin", str(e)))
        except ConfigError as e:
            problems.extend((f"discovery[{i}].{k}" if k else f"discovery[{i}]", m)
                            for k, m in e.problems)
    if problems or cfg is None:
        raise ConfigError(problems, path)
    return cfg


def _raw_sources(path: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(plugin, name, options) of each well-formed [[discovery]] table of a config that
    failed to load, so the plugins can still report their own problems."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return []
    data = expand_env(data, [])  # as load does (its problems are reported already)
    tables = data.get("discovery")
    if not isinstance(tables, list):
        return []
    sources = []
    for table in tables:
        if isinstance(table, dict) and isinstance(table.get("plugin"), str):
            options = {k: v for k, v in table.items() if k not in ("name", "plugin", "max_watches")}
            sources.append((table["plugin"], str(table.get("name", "")), options))
    return sources


def fail_config(err: ConfigError) -> None:
    for line in err.lines():
        click.echo(line, err=True)
    raise SystemExit(EXIT_USAGE)


def admin_get(admin: str, path: str) -> Any:
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
