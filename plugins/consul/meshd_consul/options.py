"""The ``[[discovery]]`` options of the Consul plugin, validated once into a frozen value.

No I/O happens here: files named by ``token_file`` / ``ca_file`` / ``cert_file`` are read
when used (the token on every request, so a rotated token is picked up).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshd.config import parse_duration
from meshd.errors import ConfigError

# Consul caps a blocking query's wait at 10 minutes ("Blocking Queries" in the API docs).
MAX_WAIT = 600.0
_DC = re.compile(r"[A-Za-z0-9_.-]+")
_DEFAULT_PORTS = {"http": 8500, "https": 8501}  # Consul's default HTTP and HTTPS ports


@dataclass(frozen=True, slots=True)
class ConsulOptions:
    scheme: str = "http"
    host: str = "127.0.0.1"          # IPv6 in brackets, ready for a URL
    port: int = 8500
    token_file: str = ""
    datacenter: str = ""
    passing_only: bool = True
    tags: tuple[str, ...] = ()
    node_meta: tuple[tuple[str, str], ...] = ()
    wait: float = 300.0
    timeout: float = 10.0            # on top of wait (+ wait/16 of server jitter)
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    verify: bool = True
    zone_meta: str = "zone"
    min_interval: float = 0.1

    @property
    def agent(self) -> str:
        """``host:port`` as error messages show it."""
        return f"{self.host}:{self.port}"


def parse_options(options: Mapping[str, Any]) -> ConsulOptions:
    """Validate the table; every problem is reported at once, keyed by its option name."""
    problems: list[tuple[str, str]] = []
    values: dict[str, Any] = {}

    def take(key: str, convert: Any) -> None:
        if key not in options:
            return
        try:
            values[key] = convert(options[key])
        except ValueError as e:
            problems.append((key, str(e)))

    for key in options:
        if key not in _KEYS:
            problems.append((key, f"unknown key (known: {', '.join(sorted(_KEYS))})"))

    if "address" in options:
        try:
            values["scheme"], values["host"], values["port"] = _address(options["address"])
        except ValueError as e:
            problems.append(("address", str(e)))
    for key in ("token_file", "ca_file", "cert_file", "key_file"):
        take(key, _path)
    take("datacenter", _datacenter)
    take("zone_meta", _nonempty)
    for key in ("passing_only", "verify"):
        take(key, _bool)
    take("tags", _tags)
    take("node_meta", _node_meta)
    take("wait", _duration(0.001, MAX_WAIT))
    take("timeout", _duration(0.001, 3600.0))
    take("min_interval", _duration(0.0, 3600.0))
    if bool(values.get("cert_file")) != bool(values.get("key_file")):
        problems.append(("cert_file" if "key_file" in values else "key_file",
                         "cert_file and key_file go together (a client certificate and its key)"))
    if problems:
        raise ConfigError(problems)
    return ConsulOptions(**values)


def split_service(service: str, default_dc: str) -> tuple[str, str]:
    """``web@dc2`` -> ("web", "dc2"); a bare name uses the configured datacenter."""
    name, sep, dc = service.partition("@")
    return name, (dc if sep and dc else default_dc)


def _address(value: object) -> tuple[str, str, int]:
    if not isinstance(value, str) or not value:
        raise ValueError(f'expected a URL like "http://127.0.0.1:8500", got {value!r}')
    url = urllib.parse.urlsplit(value if "://" in value else f"http://{value}")
    if url.scheme not in _DEFAULT_PORTS:
        raise ValueError(f"scheme must be http or https, got {url.scheme!r}")
    if url.path not in ("", "/") or url.query or url.fragment or url.username:
        raise ValueError(f"expected scheme://host:port only, got {value!r}")
    try:
        port = url.port or _DEFAULT_PORTS[url.scheme]
    except ValueError:
        raise ValueError(f"bad port in {value!r}") from None
    host = url.hostname or ""
    if not host:
        raise ValueError(f"no host in {value!r}")
    return url.scheme, f"[{host}]" if ":" in host else host, port


def _path(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a file path, got {value!r}")
    return value


def _nonempty(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def _datacenter(value: object) -> str:
    if not isinstance(value, str) or not _DC.fullmatch(value):
        raise ValueError(f"expected a datacenter name like \"dc1\", got {value!r}")
    return value


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _tags(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(t, str) and t for t in value):
        raise ValueError(f"expected a list of non-empty strings, got {value!r}")
    return tuple(value)


def _node_meta(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a table of key = \"value\" strings, got {value!r}")
    for k, v in value.items():
        if not isinstance(v, str) or ":" in k:
            raise ValueError(f"{k}: expected a string value (and no ':' in the key), got {v!r}")
    return tuple(sorted(value.items()))


def _duration(minimum: float, maximum: float) -> Any:
    def convert(value: object) -> float:
        seconds = parse_duration(value)
        if not minimum <= seconds <= maximum:
            raise ValueError(f"must be between {minimum:g}s and {maximum:g}s, got {value!r}")
        return seconds
    return convert


_KEYS = {"address", "token_file", "datacenter", "passing_only", "tags", "node_meta", "wait",
         "timeout", "ca_file", "cert_file", "key_file", "verify", "zone_meta", "min_interval"}
