"""What the subcommands share: loading a config with plugin validation, admin requests."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import click

from meshd import config as config_mod
from meshd.config import Config
from meshd.discovery.registry import load as load_plugin
from meshd.errors import ConfigError, PluginError

EXIT_USAGE = 2


def load_checked(path: str) -> Config:
    """The config at ``path``, with every discovery source's own keys validated by its
    plugin. Raises ConfigError listing every problem."""
    cfg = config_mod.load(path)
    problems: list[tuple[str, str]] = []
    for i, src in enumerate(cfg.discovery):
        try:
            cls, _info = load_plugin(src.plugin)
            cls(src.name, src.options)
        except PluginError as e:
            problems.append((f"discovery[{i}].plugin", str(e)))
        except ConfigError as e:
            problems.extend((f"discovery[{i}].{k}" if k else f"discovery[{i}]", m)
                            for k, m in e.problems)
    if problems:
        raise ConfigError(problems, path)
    return cfg


def fail_config(err: ConfigError) -> None:
    for line in err.lines():
        click.echo(line, err=True)
    raise SystemExit(EXIT_USAGE)


def admin_get(admin: str, path: str) -> Any:
    url = f"http://{admin}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError) as e:
        raise click.ClickException(f"cannot reach the admin API at {url}: {e}") from None
