"""Reading one TOML table of the config: each key taken once under its key path, a bad
value reported and replaced by its default so one pass collects every problem, and the
converters the sections share (durations, integers in a range, choices, names).

``meshd.config`` (the schema) and ``meshd.config_identity`` build on it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, fields
from types import MappingProxyType
from typing import Any, TypeVar

T = TypeVar("T")
Problems = list[tuple[str, str]]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object) -> float:
    """Seconds from "250ms", "10s", "1.5s", "5m" or "1h"; a unit is required."""
    if not isinstance(value, str):
        raise ValueError(f'expected a duration string with a unit like "10s" or "250ms", '
                         f"got {show(value)}")
    match = _DURATION.fullmatch(value)
    if match is None:
        raise ValueError(f'expected a duration with a unit (ms, s, m, h) like "10s", got {value!r}')
    return float(match[1]) * _UNIT_SECONDS[match[2]]


def default(cls: type, name: str) -> Any:
    """The default of field ``name`` of config dataclass ``cls``: each default is written
    once, on the dataclass, and ``parse`` takes it from there."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            break
    raise KeyError(f"{cls.__name__}.{name} has no default")


def array(top: Table, key: str, required: bool) -> list[Table]:
    """The tables of an array of tables (``[[key]]``), each reading under ``key[i]``."""
    raw = top.raw(key, [])
    if not isinstance(raw, list):
        top.problem(key, f"expected an array of tables ([[{key}]]), got {show(raw)}")
        return []
    if required and not raw:
        top.problem(key, f"at least one [[{key}]] is required")
    return [Table(item, f"{key}[{i}]", top.problems) for i, item in enumerate(raw)]


class Table:
    """One TOML table being read: each known key is taken once, what is left is unknown.

    A value that fails its converter is reported under its key path and replaced by the
    default, so reading goes on and every problem of the file is collected in one pass.
    """

    def __init__(self, data: object, path: str, problems: Problems) -> None:
        self.path = path
        self.problems = problems
        self.bad: set[str] = set()  # keys that were missing or invalid
        self.ok = isinstance(data, Mapping)
        self._left: dict[str, Any] = dict(data) if isinstance(data, Mapping) else {}
        if not self.ok:
            problems.append((path, f"expected a table, got {show(data)}"))

    def take(self, key: str, convert: Callable[[object], T], default: T,
             required: bool = False) -> T:
        if key not in self._left:
            if required and self.ok:
                self.problem(key, "required")
            return default
        try:
            return convert(self._left.pop(key))
        except ValueError as e:
            self.problem(key, str(e))
            return default

    def field(self, cls: type, key: str, convert: Callable[[object], T]) -> T:
        """``take`` with the default of ``cls``'s dataclass field named ``key``."""
        return self.take(key, convert, default(cls, key))

    def raw(self, key: str, default: object = MappingProxyType({})) -> object:
        """Take a value as it is (a sub-table, read by its own ``Table``)."""
        return self._left.pop(key, default)

    def problem(self, key: str, message: str) -> None:
        self.bad.add(key)
        self.problems.append((f"{self.path}.{key}" if self.path else key, message))

    def rest(self) -> dict[str, Any]:
        """Hand over the keys not taken (for tables whose other keys belong to someone else)."""
        left, self._left = self._left, {}
        return left

    def finish(self) -> None:
        for key in self.rest():
            self.problem(key, "unknown key")


def show(value: object) -> str:
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {show(value)}")
    return value


def string_list(value: object, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"expected a list of {what}, got {show(value)}")
    return value


def integer(low: int, high: int | None = None) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):  # True is not 1 here
            raise ValueError(f"expected an integer, got {show(value)}")
        if high is None and value < low:
            raise ValueError(f"must be at least {low}, got {value}")
        if high is not None and not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value
    return convert


def duration(minimum: float = 0.001) -> Callable[[object], float]:
    def convert(value: object) -> float:
        seconds = parse_duration(value)
        if seconds < minimum:
            shown = f"{minimum:g}s" if minimum >= 1 or minimum == 0 else f"{minimum * 1000:g}ms"
            raise ValueError(f"must be at least {shown}, got {value!r}")
        return seconds
    return convert


def string(pattern: re.Pattern[str] | None = None) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {show(value)}")
        if not value:
            raise ValueError("must not be empty")
        if pattern is not None and not pattern.fullmatch(value):
            raise ValueError(f"must match {pattern.pattern}, got {value!r}")
        return value
    return convert


def choice(*options: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        for option in options:
            if value == option:
                return option
        shown = ", ".join(f'"{o}"' for o in options)
        raise ValueError(f"expected one of {shown}, got {show(value)}")
    return convert
