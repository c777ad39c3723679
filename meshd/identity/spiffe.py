"""SPIFFE IDs and the allow-list patterns of ``[[authorization]]``.

A SPIFFE ID is ``spiffe://TRUST-DOMAIN/PATH`` (the SPIFFE-ID standard, section 2): the
trust domain is lowercase letters, digits, ".", "-" and "_"; the path is one or more
segments of letters, digits, ".", "-" and "_", none empty, "." or ".."; at most 2048
bytes in all. No query, fragment, port or user info.

A pattern is a SPIFFE ID in which ``*`` may stand, within one segment (never across a
"/"), for any run of segment characters: ``spiffe://cluster.local/ns/prod/sa/*``,
``spiffe://cluster.local/ns/*/sa/web``, ``spiffe://*.consul/ns/default/dc/*/svc/web``.
"""

from __future__ import annotations

import re

MAX_LENGTH = 2048
SCHEME = "spiffe://"
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_PATTERN_SEGMENT = re.compile(r"[A-Za-z0-9._*-]+")
_PATTERN_DOMAIN = re.compile(r"[a-z0-9._*-]+")


def problem(value: str) -> str | None:
    """Why ``value`` is not a SPIFFE ID with a path, or None when it is one."""
    return _problem(value, _TRUST_DOMAIN, _SEGMENT)


def trust_domain_problem(value: str) -> str | None:
    if not value or len(value) > 255 or not _TRUST_DOMAIN.fullmatch(value):
        return (f"{value!r} is not a trust domain (lowercase letters, digits, '.', '-', '_'; "
                f"at most 255)")
    return None


def trust_domain(spiffe_id: str) -> str:
    """The trust domain of a valid SPIFFE ID."""
    return spiffe_id[len(SCHEME):].split("/", 1)[0]


def pattern_problem(value: str) -> str | None:
    """Why ``value`` is not an allow-list pattern, or None when it is one."""
    return _problem(value, _PATTERN_DOMAIN, _PATTERN_SEGMENT)


def compile_patterns(patterns: list[str] | tuple[str, ...]) -> re.Pattern[str]:
    """One regex matching any of ``patterns`` (each valid per ``pattern_problem``):
    ``*`` matches within one segment only."""
    parts = []
    for p in patterns:
        pieces = [re.escape(piece) for piece in p.split("*")]
        parts.append("[A-Za-z0-9._-]*".join(pieces))
    return re.compile("|".join(f"(?:{p})" for p in parts) if parts else "(?!)")


def _problem(value: str, domain_re: re.Pattern[str], segment_re: re.Pattern[str]) -> str | None:
    if not isinstance(value, str) or not value.startswith(SCHEME):
        return f"{value!r} is not a SPIFFE ID (spiffe://TRUST-DOMAIN/PATH)"
    if len(value.encode()) > MAX_LENGTH:
        return f"a SPIFFE ID is at most {MAX_LENGTH} bytes"
    rest = value[len(SCHEME):]
    domain, slash, path = rest.partition("/")
    if not domain or not domain_re.fullmatch(domain):
        return (f"{value!r}: the trust domain {domain!r} is not lowercase letters, digits, "
                f"'.', '-', '_'")
    if not slash or not path:
        return f"{value!r} has no path (spiffe://{domain}/...)"
    for segment in path.split("/"):
        if not segment:
            return f"{value!r} has an empty path segment"
        if segment in (".", ".."):
            return f"{value!r} has a '.' or '..' path segment"
        if not segment_re.fullmatch(segment):
            return f"{value!r}: the segment {segment!r} has a character outside A-Z a-z 0-9 . - _"
    return None


def for_service(trust_domain: str, service: str) -> str:
    """The SPIFFE ID meshd uses for a service outside Kubernetes."""
    return f"{SCHEME}{trust_domain}/service/{service}"


def for_service_account(trust_domain: str, namespace: str, account: str) -> str:
    """The SPIFFE ID of a Kubernetes service account (Istio's and Linkerd's shape)."""
    return f"{SCHEME}{trust_domain}/ns/{namespace}/sa/{account}"
