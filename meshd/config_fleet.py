"""The config of fleet control: ``[[config_source]]`` tables (CONTRACT, "Fleet control").

Each table names a config-source plugin (entry-point group ``meshd.config``) and carries
its options: every key beside ``name`` and ``plugin`` belongs to the plugin, which
validates them (``meshd.validate`` constructs it in ``meshd check``, at start and on HUP,
so all three refuse the same tables with the same ``config_source[i].KEY`` lines).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from meshd.config_table import Table, string

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
OWN_KEYS = ("name", "plugin")   # meshd's; the rest are the plugin's


@dataclass(frozen=True, slots=True)
class ConfigSourceConfig:
    name: str
    plugin: str                   # entry-point name in the group meshd.config
    options: Mapping[str, Any]    # the plugin's own keys, read-only


def config_source(t: Table) -> ConfigSourceConfig:
    name = t.take("name", string(_NAME), "", required=True)
    plugin = t.take("plugin", string(), "", required=True)
    return ConfigSourceConfig(name=name, plugin=plugin, options=MappingProxyType(t.rest()))
