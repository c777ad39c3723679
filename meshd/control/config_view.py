"""The effective config as JSON for admin ``/config``, secrets masked.

What a running meshd applies: every key with its default filled in, the ``${VAR}``
references expanded, listeners resolved (e.g. an inbound listener's ``mtls``). Values
that may be secrets show as ``"***"``: a key whose name holds ``token``, ``password``,
``passwd``, ``secret``, ``credential`` or ``api_key`` (plugin options such as Consul's
``token`` and an ``[identity]`` provider's keys come as the user wrote them, so names are
all meshd can go by), unless it names a file (``*_file``, ``*_path``, ``*_dir``: only the
path is in the config, never a file's content); and the password of a URL's userinfo
(``http://user:pass@host``), whatever its key.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from meshd.config import Address, Config

MASK = "***"
_SECRET_NAME = re.compile(r"token|passw|secret|credential|api_?key", re.IGNORECASE)
_FILE_NAME = re.compile(r"_(file|path|dir)$", re.IGNORECASE)
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@:]*):[^/@]*@")


def secret_name(key: str) -> bool:
    """Whether a key's value is masked (see the module's docstring)."""
    return bool(_SECRET_NAME.search(key)) and not _FILE_NAME.search(key)


def to_json(value: Any, key: str = "") -> Any:
    """``value`` as JSON types, secrets masked by their key's name."""
    if key and secret_name(key) and value not in (None, "", [], {}):
        return MASK
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if isinstance(value, Address):
            return str(value)
        return {f.name: to_json(getattr(value, f.name), f.name)
                for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_json(v, str(k)) for k, v in value.items()}
    if isinstance(value, (frozenset, set)):
        return sorted(to_json(v) for v in value)
    if isinstance(value, (tuple, list)):
        return [to_json(v, key) for v in value]
    if isinstance(value, str):
        return _USERINFO.sub(rf"\1:{MASK}@", value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return str(value)


def effective(config: Config) -> dict[str, Any]:
    """The whole config, as ``/config`` serves it."""
    body = to_json(config)
    assert isinstance(body, dict)
    return body
