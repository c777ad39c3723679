"""The dashboard's static files on the admin server: ``/`` (the page),
``/dashboard/app.js``, ``/dashboard/app.css`` and the icon.

The files ship inside the package (``meshd/assets/dashboard/``, package data in
setup.cfg) and are read once, at the first request. The page fetches only the admin
API's own JSON (``/stats``, ``/endpoints``, ``/status``, ``/ready``): no CDN, no web
fonts. Every answer carries a Content-Security-Policy that allows scripts, styles and
fetches from this origin only (no inline script or style, no framing, no forms), with
``nosniff`` and no referrer. Files are served ``no-cache`` with an ETag: a browser
revalidates them (a 304 when unchanged), so an upgraded meshd never runs an old script.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any

StartResponse = Callable[[str, list[tuple[str, str]]], Any]

FILES = {   # path -> (file in meshd/assets/dashboard, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/dashboard/app.css": ("app.css", "text/css; charset=utf-8"),
    "/dashboard/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
PATHS = frozenset(FILES)
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
]


def _read(name: str) -> bytes:
    return resources.files("meshd").joinpath("assets", "dashboard", name).read_bytes()


class Dashboard:
    """A WSGI app for PATHS only (the admin router sends those here)."""

    def __init__(self, read: Callable[[str], bytes] = _read) -> None:
        self._read = read
        self._files: dict[str, tuple[bytes, str, str]] = {}   # path -> (body, type, etag)

    def _file(self, path: str) -> tuple[bytes, str, str]:
        cached = self._files.get(path)
        if cached is None:
            name, ctype = FILES[path]
            body = self._read(name)
            etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
            cached = self._files[path] = (body, ctype, etag)
        return cached

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        headers = list(SECURITY_HEADERS)
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _answer(start_response, "405 Method Not Allowed", "text/plain", b"GET only\n",
                           headers + [("Allow", "GET, HEAD")])
        try:
            body, ctype, etag = self._file(environ.get("PATH_INFO", ""))
        except OSError as e:   # a package installed without its data files
            return _answer(start_response, "500 Internal Server Error", "text/plain",
                           f"dashboard files missing from the meshd package: {e}\n".encode(),
                           headers)
        headers += [("Cache-Control", "no-cache"), ("ETag", etag)]
        if etag in environ.get("HTTP_IF_NONE_MATCH", ""):
            start_response("304 Not Modified", headers)
            return [b""]
        return _answer(start_response, "200 OK", ctype, body, headers)


def _answer(start_response: StartResponse, status: str, ctype: str, body: bytes,
            headers: list[tuple[str, str]]) -> list[bytes]:
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body))),
                            *headers])
    return [body]
