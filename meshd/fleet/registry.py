"""The config-source plugin registry: sources published under the ``meshd.config``
group (``[[config_source]] plugin`` names one; ``meshd.plugin_registry`` is the
implementation, shared with discovery and identity plugins)."""

from __future__ import annotations

from meshd.plugin_registry import PluginInfo, Registry

GROUP = "meshd.config"
REGISTRY = Registry(GROUP, "config", "a config source class with a watch() method")
available = REGISTRY.available
load = REGISTRY.load

__all__ = ["GROUP", "REGISTRY", "PluginInfo", "available", "load"]
