"""The ``files`` identity provider: certificate, key and CA bundle from files that
something else keeps fresh (cert-manager's Secret mounted in the pod, the SPIRE
helper, a Vault agent's templates).

```toml
[identity]
provider = "files"
cert_file = "/var/run/meshd/identity/tls.crt"   # the leaf first, then intermediates
key_file = "/var/run/meshd/identity/tls.key"
ca_file = "/var/run/meshd/identity/ca.crt"      # the roots peers are verified with
poll = "1s"                                      # how often the files are read
```

``watch`` yields a Material when it has read all three files and again each time the
content of any of them changes. It compares content, not times: a Kubernetes Secret
volume swaps its files atomically through symbolic links (``tls.crt ->
..data/tls.crt``, ``..data -> ..2024_05_01_...``, the new ``..data`` renamed into
place), a Vault agent or ``cp -p`` may keep an mtime, and both are seen all the same.
Every poll reads the files twice; two reads that differ mean a writer is at work and
the poll is skipped, so a rotation is rarely seen half-done. One that still is (a new
certificate with the old key) is refused by ``meshd.identity.material.check`` in the
control process, and the next poll, which sees the rest of the rotation, yields again.

Files that do not exist yet (a SPIRE helper that has not fetched its first SVID) are
waited for: meshd does not report ready before it has an identity. Each file is at
most MAX_FILE bytes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

from meshd.config_table import duration
from meshd.errors import ConfigError
from meshd.identity.api import API_VERSION, Material, Settings

MAX_FILE = 1 << 20
FILES = ("cert_file", "key_file", "ca_file")
KNOWN = (*FILES, "poll")
DEFAULT_POLL = 1.0


class FilesProvider:
    """Material read from ``cert_file``, ``key_file`` and ``ca_file``."""

    api_version = API_VERSION
    fail_open = False

    def __init__(self, options: Mapping[str, Any], settings: Settings) -> None:
        self.settings = settings
        problems: list[tuple[str, str]] = []
        paths: dict[str, str] = {}
        for key in FILES:
            value = options.get(key)
            if value is None:
                problems.append((key, "required"))
            elif not isinstance(value, str) or not value:
                problems.append((key, f"expected a file path, got {value!r}"))
            else:
                folder = os.path.dirname(os.path.abspath(value))
                if not os.path.isdir(folder):
                    problems.append((key, f"the directory {folder} of {value} does not exist"))
                paths[key] = value
        self.poll = DEFAULT_POLL
        if "poll" in options:
            try:
                self.poll = duration(0.05)(options["poll"])
            except ValueError as e:
                problems.append(("poll", str(e)))
        for key in sorted(set(options) - set(KNOWN)):
            problems.append((key, f"unknown key (known: {', '.join(sorted(KNOWN))})"))
        if problems:
            raise ConfigError(problems)
        self.cert_file, self.key_file, self.ca_file = (paths[k] for k in FILES)
        self.error: str | None = None   # why the last poll could not read the files

    def read(self) -> tuple[bytes, bytes, bytes] | None:
        """The three files' contents, or None (``error`` says why) when one is missing,
        unreadable or too large, or changed between two reads (a writer at work)."""
        first = self._read_all()
        if first is None:
            return None
        second = self._read_all()
        if second != first:
            self.error = "the files changed while being read (a rotation in progress)"
            return None
        return first

    def _read_all(self) -> tuple[bytes, bytes, bytes] | None:
        out = []
        for key, path in zip(FILES, (self.cert_file, self.key_file, self.ca_file), strict=True):
            try:
                with open(path, "rb") as f:
                    data = f.read(MAX_FILE + 1)
            except OSError as e:
                self.error = f"{key} {path}: {e.strerror or e}"
                return None
            if len(data) > MAX_FILE:
                self.error = f"{key} {path}: larger than {MAX_FILE} bytes"
                return None
            out.append(data)
        self.error = None
        return out[0], out[1], out[2]

    def watch(self) -> Iterator[Material]:
        last: tuple[bytes, bytes, bytes] | None = None
        while True:
            now = self.read()
            if now is not None and now != last:
                last = now
                yield Material(chain_pem=now[0], key_pem=now[1], roots_pem=now[2])
            time.sleep(self.poll)   # cooperative: the control process is gevent-patched

    def authorizes(self) -> bool:
        return False

    def authorize(self, client_id: str) -> bool:
        raise NotImplementedError("the files provider does not authorize")
