"""Reading API objects as untrusted JSON, for the translations of routes
(``meshd_kubernetes.routes``) and authorization policies (``meshd_kubernetes.authz``):
each step checks the shape it expects and names the field path when it is not there."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

MAX_ITEMS = 64   # the Gateway API CRDs' own maxItems for rules, matches, filters
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


class Invalid(ValueError):
    """An object meshd cannot apply: the reason starts with the field path."""


def timestamp(raw: Any) -> datetime.datetime:
    """RFC 3339 as the API server writes it; unknown sorts first (as the oldest)."""
    if isinstance(raw, str):
        try:
            t = datetime.datetime.fromisoformat(raw.replace("Z", "+00:00"))
            return t if t.tzinfo else t.replace(tzinfo=datetime.UTC)
        except ValueError:
            pass
    return EPOCH


def as_map(raw: Any, at: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise Invalid(f"{at}: expected an object")
    return raw


def as_list(raw: Any, at: str) -> list[Any]:
    if not isinstance(raw, list):
        raise Invalid(f"{at}: expected a list")
    if len(raw) > MAX_ITEMS:
        raise Invalid(f"{at}: more than {MAX_ITEMS} items")
    return raw


def object_name(obj: Mapping[str, Any]) -> str:
    md = obj.get("metadata")
    return str(md.get("name") or "") if isinstance(md, Mapping) else ""
