"""Plugins published under an entry-point group, one implementation for every kind
(discovery backends in ``meshd.discovery``, identity providers in ``meshd.identity``).

Plugins are found from distribution metadata without importing them (``available``),
and imported only when a config names one (``load``). Import errors are wrapped in a
``PluginError`` that names the distribution, so a user knows which package to fix.
Two distributions that publish the same name are refused rather than picking one.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from meshd.errors import PluginError, PluginImportError


@dataclass(frozen=True, slots=True)
class PluginInfo:
    name: str
    distribution: str
    version: str
    value: str                       # "module:attr"
    entry_point: EntryPoint

    def describe(self) -> str:
        return f"{self.name} from {self.distribution} {self.version}"


class Registry:
    """The plugins of one entry-point ``group``; ``kind`` is the word errors use
    ("discovery", "identity") and ``shape`` what a published class must be (its
    ``watch()`` is the one method every kind has)."""

    def __init__(self, group: str, kind: str, shape: str) -> None:
        self.group = group
        self.kind = kind
        self.shape = shape

    def available(self) -> tuple[dict[str, PluginInfo], dict[str, str]]:
        """Installed plugins by name, and the names refused (name -> why)."""
        found: dict[str, list[PluginInfo]] = {}
        for ep in entry_points(group=self.group):
            dist = ep.dist
            info = PluginInfo(
                name=ep.name,
                distribution=dist.metadata["Name"] if dist is not None else "?",
                version=dist.version if dist is not None else "?",
                value=ep.value,
                entry_point=ep,
            )
            same = found.setdefault(ep.name, [])
            if all(i.distribution != info.distribution for i in same):
                same.append(info)
        plugins: dict[str, PluginInfo] = {}
        refused: dict[str, str] = {}
        for name, infos in found.items():
            if len(infos) > 1:
                dists = ", ".join(sorted(i.distribution for i in infos))
                refused[name] = f"published by more than one distribution: {dists}"
            else:
                plugins[name] = infos[0]
        return plugins, refused

    def load(self, name: str) -> tuple[type, PluginInfo]:
        """Import the class published under ``name``."""
        plugins, refused = self.available()
        if name in refused:
            raise PluginError(f"{self.kind} plugin {name!r} refused: {refused[name]}")
        info = plugins.get(name)
        if info is None:
            known = ", ".join(sorted(plugins)) or "none"
            raise PluginError(f"no {self.kind} plugin named {name!r} is installed "
                              f"(installed: {known})")
        try:
            cls = info.entry_point.load()
        except Exception as e:  # a plugin's import may fail in any way: name the culprit
            raise PluginImportError(
                f"{self.kind} plugin {name!r} from distribution {info.distribution} "
                f"{info.version} failed to import: {type(e).__name__}: {e}"
            ) from e
        if not isinstance(cls, type) or not callable(getattr(cls, "watch", None)):
            raise PluginError(
                f"{self.kind} plugin {name!r} from distribution {info.distribution}: "
                f"{info.value} is not {self.shape}"
            )
        return cls, info
