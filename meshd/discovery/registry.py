"""The discovery plugin registry: backends published under the ``meshd.discovery``
group (``meshd.plugin_registry`` is the implementation, shared with identity providers)."""

from __future__ import annotations

from meshd.plugin_registry import PluginInfo, Registry

GROUP = "meshd.discovery"
REGISTRY = Registry(GROUP, "discovery", "a backend class with a watch() method")
available = REGISTRY.available
load = REGISTRY.load

__all__ = ["GROUP", "REGISTRY", "PluginInfo", "available", "load"]
