"""meshd's config for the kubernetes plugin reading a test API server
(``meshd.testing.k8s_server.K8sApiServer``): the ``[[config_source]]`` or
``[[discovery]]`` table, and the token file it names.

    text, ports = mesh.config({}, extra=kubernetes_table(api, tmp_path, "discovery")
                              + '[service.web]\\ndiscovery = "k8s"\\n')
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshd.testing.k8s_server import K8sApiServer

TOKEN = "test-token"   # one of K8sApiServer's default tokens


def token_file(workdir: Path) -> Path:
    """``workdir/k8s.token``, holding the token the test API server accepts."""
    path = workdir / "k8s.token"
    path.write_text(TOKEN + "\n")
    return path


def kubernetes_table(api: K8sApiServer, workdir: Path, table: str = "config_source", *,
                     name: str = "k8s", timeout: str | None = "2s", lines: str = "") -> str:
    """The TOML table ``[[table]]`` (``config_source`` or ``discovery``) named ``name``
    of the kubernetes plugin reading ``api`` in namespace default, with its CA and the
    token file (:func:`token_file` in ``workdir``), the plugin's request ``timeout``
    (None: the default), then ``lines`` (more keys of the table, one a line)."""
    token = token_file(workdir)
    return textwrap.dedent(f"""\
        [[{table}]]
        name = "{name}"
        plugin = "kubernetes"
        api_server = "{api.url}"
        token_file = "{token}"
        ca_file = "{api.ca_file}"
        namespace = "default"
        """) + (f'timeout = "{timeout}"\n' if timeout is not None else "") + (
        textwrap.dedent(lines).strip() + "\n" if lines.strip() else "")
