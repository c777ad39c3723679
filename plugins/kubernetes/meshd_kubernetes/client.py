"""A small Kubernetes API client over ``requests``: GET JSON, and watch streams.

Where to connect comes from ``Settings``: in a pod, the service account (the
``KUBERNETES_SERVICE_HOST``/``_PORT`` environment, the token and CA files); outside, an
explicit ``api_server`` or a kubeconfig (``kubeconfig.py``). Bound service-account
tokens rotate, so the token file is re-read at most every ``TOKEN_REFRESH`` seconds and
again after a 401 (one retry). Every request has a deadline; a watch's read deadline is
its ``timeoutSeconds`` plus the request timeout, so a silent stream ends too.

Each error raised is a ``KubernetesError`` that names the server and what was being
done: ``kubernetes https://10.0.0.1:443: 403 Forbidden listing endpointslices in ns
default: <the API server's message>``.

``requests`` (and so urllib3 and ssl) is imported on first use, not with this module:
meshd's master imports plugins to validate a config before it forks the control
process, which must patch gevent before ssl is imported.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshd.errors import MeshdError

if TYPE_CHECKING:
    import requests

TOKEN_REFRESH = 60.0


class KubernetesError(MeshdError):
    """The API server could not be reached or answered with an error."""

    def __init__(self, reason: str, status: int = 0) -> None:
        super().__init__(reason)
        self.code = status


class StreamBroken(KubernetesError):
    """A watch stream broke mid-way (the connection closed without the final chunk)."""


class Gone(KubernetesError):
    """410: the resourceVersion asked for is older than the server's history; re-list."""


@dataclass(frozen=True, slots=True)
class Settings:
    server: str                       # "https://host:port"
    ca_file: str | None               # None: the system trust store
    verify: bool = True
    token: str | None = None          # a fixed token (kubeconfig)
    token_file: str | None = None     # re-read periodically
    token_file_required: bool = False  # configured explicitly: missing is an error
    client_cert: tuple[str, str] | None = None
    namespace: str | None = None      # from a kubeconfig context


class Client:
    """One per watch: a session with its own connection pool, closable from another
    greenlet or thread (``close`` shuts the socket of a running stream down)."""

    def __init__(self, settings: Settings, timeout: float) -> None:
        import requests  # see the module docstring

        self.s = settings
        self.timeout = timeout
        self.session = requests.Session()
        # Passed with every request: a session-level verify loses to REQUESTS_CA_BUNDLE.
        self.verify: str | bool = (settings.ca_file or True) if settings.verify else False
        if settings.client_cert:
            self.session.cert = settings.client_cert
        self._token: str | None = settings.token
        self._token_read = -TOKEN_REFRESH
        self._lock = threading.Lock()
        self._stream: requests.Response | None = None
        self.closed = False

    # -- auth --

    def _auth(self, force: bool = False) -> dict[str, str]:
        path = self.s.token_file
        if path and (force or time.monotonic() - self._token_read >= TOKEN_REFRESH):
            try:
                with open(path, encoding="utf-8") as f:
                    self._token = f.read().strip() or None
                self._token_read = time.monotonic()
            except OSError as e:
                if self.s.token_file_required:
                    raise KubernetesError(f"kubernetes {self.s.server}: cannot read token_file "
                                          f"{path}: {e.strerror}") from e
                self._token = self.s.token
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    # -- requests --

    def _send(self, path: str, params: dict[str, str], what: str,
              stream: bool = False, read_timeout: float | None = None) -> requests.Response:
        import requests
        url = self.s.server + path
        timeout = (self.timeout, read_timeout or self.timeout)
        headers = {"Accept": "application/json"}
        for attempt in (0, 1):
            if self.closed:
                raise KubernetesError(f"kubernetes {self.s.server}: client closed")
            try:
                resp = self.session.get(url, params=params, stream=stream, timeout=timeout,
                                        verify=self.verify,
                                        headers={**headers, **self._auth(force=attempt > 0)})
            except requests.RequestException as e:
                raise KubernetesError(f"kubernetes {self.s.server}: {what}: "
                                      f"{_short(e)}") from e
            if resp.status_code == 401 and attempt == 0 and self.s.token_file:
                resp.close()
                continue  # the token may have rotated: re-read the file and retry once
            if resp.status_code >= 400:
                raise _status_error(self.s.server, resp, what)
            return resp
        raise AssertionError("unreachable")

    def get(self, path: str, params: dict[str, str], what: str) -> dict[str, Any]:
        resp = self._send(path, params, what)
        try:
            body = resp.json()
        except ValueError as e:
            raise KubernetesError(f"kubernetes {self.s.server}: {what}: the answer is not "
                                  f"JSON") from e
        if not isinstance(body, dict):
            raise KubernetesError(f"kubernetes {self.s.server}: {what}: unexpected answer")
        return body

    def patch(self, path: str, body: Mapping[str, Any], what: str) -> None:
        """A JSON merge patch (RFC 7386) of ``path`` (route status: ``status.py``)."""
        import requests
        headers = {"Accept": "application/json",
                   "Content-Type": "application/merge-patch+json"}
        data = json.dumps(body).encode()
        for attempt in (0, 1):
            if self.closed:
                raise KubernetesError(f"kubernetes {self.s.server}: client closed")
            try:
                resp = self.session.patch(self.s.server + path, data=data, verify=self.verify,
                                          timeout=(self.timeout, self.timeout),
                                          headers={**headers, **self._auth(force=attempt > 0)})
            except requests.RequestException as e:
                raise KubernetesError(f"kubernetes {self.s.server}: {what}: "
                                      f"{_short(e)}") from e
            if resp.status_code == 401 and attempt == 0 and self.s.token_file:
                resp.close()
                continue
            if resp.status_code >= 400:
                raise _status_error(self.s.server, resp, what)
            resp.close()
            return

    def exists(self, path: str, what: str) -> bool:
        try:
            self.get(path, {}, what)
        except KubernetesError as e:
            if e.code == 404:
                return False
            raise
        return True

    def watch(self, path: str, params: dict[str, str], what: str,
              timeout_seconds: int) -> Generator[dict[str, Any], None, None]:
        """The events of one watch request, until the server ends the stream."""
        import requests
        params = {**params, "watch": "1", "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(timeout_seconds)}
        resp = self._send(path, params, what, stream=True,
                          read_timeout=timeout_seconds + self.timeout)
        with self._lock:
            if self.closed:  # close() ran while the request was on its way
                resp.close()
                return
            self._stream = resp
        try:
            for line in resp.iter_lines(chunk_size=None):  # type: ignore[call-overload]
                if not line:
                    continue
                try:
                    event = json.loads(line)
                except ValueError as e:
                    raise KubernetesError(f"kubernetes {self.s.server}: {what}: a watch event "
                                          f"is not JSON: {line[:100]!r}") from e
                if isinstance(event, dict):
                    yield event
        except requests.RequestException as e:
            if self.closed:
                return
            raise StreamBroken(f"kubernetes {self.s.server}: {what}: stream broke: "
                                  f"{_short(e)}") from e
        finally:
            with self._lock:
                self._stream = None
            resp.close()

    def close(self) -> None:
        """End a running watch now (its socket is shut down) and release the pool."""
        self.closed = True
        with self._lock:
            resp = self._stream
        if resp is not None:
            sock = getattr(getattr(resp.raw, "_connection", None), "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.session.close()


def _status_error(server: str, resp: requests.Response, what: str) -> KubernetesError:
    """An error from an HTTP error answer, with the Status object's message if there is one."""
    message = ""
    try:
        body = resp.json()
        if isinstance(body, dict):
            message = str(body.get("message") or "")
    except ValueError:
        message = resp.text[:200].strip()
    finally:
        resp.close()
    text = f"kubernetes {server}: {resp.status_code} {resp.reason} {what}"
    if message:
        text += f": {message}"
    cls = Gone if resp.status_code == 410 else KubernetesError
    return cls(text, resp.status_code)


def _short(e: Exception) -> str:
    """requests nests the reason deep in its messages; keep the innermost cause."""
    inner: BaseException = e
    while inner.__context__ is not None and inner.__context__ is not inner:
        inner = inner.__context__
    return f"{type(inner).__name__}: {inner}" if inner is not e else str(e)
