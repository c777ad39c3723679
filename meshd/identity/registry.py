"""The identity provider registry: providers published under the ``meshd.identity``
group (``[identity] provider`` names one; ``meshd.plugin_registry`` is the
implementation, shared with discovery plugins)."""

from __future__ import annotations

from meshd.plugin_registry import PluginInfo, Registry

GROUP = "meshd.identity"
REGISTRY = Registry(GROUP, "identity", "a provider class with a watch() method")
available = REGISTRY.available
load = REGISTRY.load

__all__ = ["GROUP", "REGISTRY", "PluginInfo", "available", "load"]
