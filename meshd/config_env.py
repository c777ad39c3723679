"""Environment variables in config values: ``"${POD_IP}:4143"``, ``"${POD_NAMESPACE}"``.

Every string value of the TOML document (at any depth, plugin keys included) has each
``${NAME}`` replaced by the variable's value when the config is parsed, so ``meshd
check``, ``meshd run`` and a reload (HUP) all see the same values. ``$${`` stands for a
literal ``${``. A variable that is not set, or a ``${`` that does not close on a valid
name, is a config problem under the value's key path. Keys are never expanded; nor is a
value's expansion (no recursion).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

_REFERENCE = re.compile(r"\$\$\{|\$\{([^}]*)\}?")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_DEPTH = 32  # TOML nesting walked (deeper values are left as they are)


def expand_env(data: Mapping[str, Any], problems: list[tuple[str, str]],
               environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A copy of ``data`` with ``${VAR}`` references in string values replaced; each
    unset or malformed reference appended to ``problems`` as (key path, message)."""
    env = os.environ if environ is None else environ
    out = _walk(data, "", problems, env, 0)
    assert isinstance(out, dict)
    return out


def _walk(value: Any, path: str, problems: list[tuple[str, str]], env: Mapping[str, str],
          depth: int) -> Any:
    if isinstance(value, str):
        return _expand(value, path, problems, env) if "${" in value else value
    if depth > MAX_DEPTH:
        return value
    if isinstance(value, Mapping):
        return {k: _walk(v, f"{path}.{k}" if path else str(k), problems, env, depth + 1)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v, f"{path}[{i}]", problems, env, depth + 1) for i, v in enumerate(value)]
    return value


def _expand(value: str, path: str, problems: list[tuple[str, str]],
            env: Mapping[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$${":
            return "${"
        name = m.group(1)
        if not m.group(0).endswith("}") or not _VAR_NAME.fullmatch(name):
            problems.append((path, f"malformed reference {m.group(0)!r}: expected ${{NAME}} "
                                   f"(write $${{ for a literal ${{)"))
            return m.group(0)
        found = env.get(name)
        if found is None:
            problems.append((path, f"environment variable {name} is not set"))
            return m.group(0)
        return found
    return _REFERENCE.sub(one, value)
