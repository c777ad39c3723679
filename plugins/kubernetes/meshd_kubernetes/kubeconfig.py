"""Connection settings from a kubeconfig file (for development outside a cluster).

Supported: the ``current-context``; its cluster's ``server``, ``certificate-authority``
(a path, relative to the kubeconfig's folder) or ``certificate-authority-data``,
``insecure-skip-tls-verify``; its user's ``token``, ``tokenFile``,
``client-certificate``/``client-key`` (paths or ``-data``); its ``namespace``.
Exec and auth-provider credential plugins are not (meshd would have to run programs);
using one is an error that says so. ``-data`` values are written to a private
temporary folder because ``requests`` takes certificates as files.
"""

from __future__ import annotations

import base64
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import yaml

from meshd_kubernetes.client import KubernetesError, Settings


def load(path: str) -> Settings:
    where = f"kubeconfig {path}"
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise KubernetesError(f"{where}: cannot read: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise KubernetesError(f"{where}: not YAML: {e}") from e
    if not isinstance(doc, Mapping):
        raise KubernetesError(f"{where}: expected a mapping at the top")
    base = os.path.dirname(os.path.abspath(path))
    current = doc.get("current-context")
    if not current:
        raise KubernetesError(f"{where}: no current-context")
    context = _named(doc, "contexts", "context", current, where)
    cluster = _named(doc, "clusters", "cluster", context.get("cluster"), where)
    user = (_named(doc, "users", "user", context["user"], where)
            if context.get("user") else {})
    if "exec" in user or "auth-provider" in user:
        raise KubernetesError(f"{where}: user {context.get('user')!r} uses an exec or "
                              f"auth-provider plugin, which meshd does not run; use a token")
    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith(("https://", "http://")):
        raise KubernetesError(f"{where}: cluster {context.get('cluster')!r}: server must be "
                              f"an http(s) URL, got {server!r}")
    ca = _file(cluster, "certificate-authority", base, where)
    cert = _file(user, "client-certificate", base, where)
    key = _file(user, "client-key", base, where)
    token_file = user.get("tokenFile")
    return Settings(
        server=server.rstrip("/"),
        ca_file=ca,
        verify=not cluster.get("insecure-skip-tls-verify", False),
        token=user.get("token") or None,
        token_file=os.path.join(base, token_file) if token_file else None,
        token_file_required=bool(token_file),
        client_cert=(cert, key) if cert and key else None,
        namespace=context.get("namespace") or None,
    )


def _named(doc: Mapping[str, Any], section: str, kind: str, name: object,
           where: str) -> Mapping[str, Any]:
    for entry in doc.get(section) or ():
        if isinstance(entry, Mapping) and entry.get("name") == name:
            value = entry.get(kind)
            if isinstance(value, Mapping):
                return value
    raise KubernetesError(f"{where}: no {kind} named {name!r} in {section}")


def _file(section: Mapping[str, Any], key: str, base: str, where: str) -> str | None:
    """A path for ``key``: given as a path, or written from ``key-data``."""
    if section.get(key):
        return os.path.join(base, section[key])
    data = section.get(f"{key}-data")
    if not data:
        return None
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError as e:
        raise KubernetesError(f"{where}: {key}-data is not base64") from e
    folder = tempfile.mkdtemp(prefix="meshd-kubeconfig-")  # mode 0700
    out = os.path.join(folder, key + ".pem")
    with open(out, "wb") as f:
        f.write(raw)
    return out
