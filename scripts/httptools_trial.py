"""Would llhttp (httptools) do for meshd's head parsers? (issue 17; docs/perf/mypyc.md)

An adapter lets llhttp (httptools' defaults: every leniency off) parse a head's start
line and fields, then runs meshd's own rules on what it returns (Host, Content-Length /
Transfer-Encoding, Connection, Expect, Upgrade; the 414 / 431 limits first). Where llhttp
refuses a head, meshd's parser names the fault (the tests check reasons); when meshd's
parser accepts it, the adapter still refuses and logs the disagreement.

httptools is not a dependency: install it aside and name the directory.

    .venv/bin/pip install --target /tmp/ht httptools
    .venv/bin/python scripts/httptools_trial.py --httptools /tmp/ht time
    .venv/bin/python scripts/httptools_trial.py --httptools /tmp/ht tests tests/test_http1.py ...

``tests`` runs pytest with the adapter installed in every process it starts (meshd's
too, through a generated ``sitecustomize``), then prints the disagreements llhttp had
with meshd's parser. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ENV = "MESHD_HTTPTOOLS_TRIAL"  # the file disagreements are appended to

SITECUSTOMIZE = f"""\
import os
if os.environ.get({ENV!r}):
    import importlib.util
    spec = importlib.util.spec_from_file_location("httptools_trial", {str(Path(__file__).resolve())!r})
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.install()
"""

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
REQUEST6 = (b"GET /api/v1/items?id=42 HTTP/1.1\r\nHost: bench.example\r\nUser-Agent: curl/8.5.0\r\n"
            b"Accept: */*\r\nAccept-Encoding: gzip\r\nX-Request-Id: 0123456789abcdef\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 08 Dec 2026 00:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 100\r\nConnection: keep-alive\r\n\r\n")


class _Fields:
    """httptools' callbacks: the target (or reason) and the fields of one head."""

    __slots__ = ("done", "headers", "reason", "url")

    def __init__(self) -> None:
        self.url = b""
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.done = True


def _disagree(kind: str, head: bytes, err: Exception) -> None:
    path = os.environ.get(ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps([kind, head[:200].decode("latin-1"), str(err)]) + "\n")


def make_parsers() -> tuple[Any, Any]:
    """(parse_request_head, parse_response_head) over llhttp, meshd's signatures."""
    import httptools

    from meshd.errors import (
        BadRequest,
        HeadersTooLarge,
        NotImplementedByProxy,
        UpstreamError,
        UriTooLong,
    )
    from meshd.proto import http1 as h

    pure_request, pure_response = h.parse_request_head, h.parse_response_head

    def parse_request_head(head: bytes, *, max_request_line: int = 8192,
                           max_headers: int = 100) -> h.RequestHead:
        if not head.endswith(h.HEAD_END):
            raise BadRequest("request head does not end with an empty line")
        start = 2 if head.startswith(b"\r\n") else 0
        eol = head.find(b"\r\n", start)
        if eol - start > max_request_line:
            raise UriTooLong(f"request line longer than {max_request_line} bytes")
        if head.count(b"\r\n") - 2 - start // 2 > max_headers:
            raise HeadersTooLarge(f"more than {max_headers} header fields")
        got = _Fields()
        parser = httptools.HttpRequestParser(got)
        try:
            parser.feed_data(head[start:])
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError as e:
            pure_request(head, max_request_line=max_request_line, max_headers=max_headers)
            _disagree("llhttp refuses a request meshd accepts", head, e)
            raise BadRequest(f"llhttp: {e}") from None
        if not got.done:
            raise BadRequest("llhttp: incomplete head")
        version = b"HTTP/" + parser.get_http_version().encode()
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise BadRequest("unsupported HTTP version")
        # meshd's rules from here, as in meshd.proto.http1.parse_request_head
        special = h._collect(got.headers)
        http11 = version == b"HTTP/1.1"
        hosts = special.get(b"host")
        host = None
        if hosts is None:
            if http11:
                raise BadRequest("missing Host header")
        elif len(hosts) > 1:
            raise BadRequest("multiple Host headers")
        else:
            host = hosts[0]
            if h._HOST.fullmatch(host) is None:
                raise BadRequest("invalid Host header")
        lengths = special.get(b"content-length")
        codings = special.get(b"transfer-encoding")
        content_length = None
        chunked = False
        if codings is not None:
            if lengths is not None:
                raise BadRequest("both Content-Length and Transfer-Encoding")
            if not http11:
                raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
            names = h._codings(codings)
            if names != [b"chunked"]:
                for name in names:
                    if name not in h._KNOWN_CODINGS:
                        raise NotImplementedByProxy(
                            f"unsupported transfer coding {name[:40].decode()!r}")
                raise BadRequest("Transfer-Encoding other than chunked")
            chunked = True
        elif lengths is not None:
            if len(lengths) > 1:
                raise BadRequest("multiple Content-Length headers")
            content_length = h._content_length(lengths[0])
        tokens = h._tokens(special.get(b"connection"))
        expect = special.get(b"expect")
        upgrades = special.get(b"upgrade")
        if not http11:
            expect = upgrades = None
        return h.RequestHead(
            method=parser.get_method(), target=got.url, version=version,
            headers=got.headers, host=host, content_length=content_length, chunked=chunked,
            keep_alive=h._keep_alive(http11, tokens),
            expect_continue=expect is not None and any(v.lower() == b"100-continue"
                                                       for v in expect),
            upgrade=b", ".join(upgrades) if upgrades and b"upgrade" in tokens else None,
            connection_tokens=tokens)

    def parse_response_head(head: bytes, *, max_headers: int = 100) -> h.ResponseHead:
        try:
            return _response(head, max_headers)
        except BadRequest as e:
            raise UpstreamError(f"invalid response from upstream: {e.reason}") from None

    def _response(head: bytes, max_headers: int) -> h.ResponseHead:
        if not head.endswith(h.HEAD_END):
            raise BadRequest("head does not end with an empty line")
        if head.count(b"\r\n") - 2 > max_headers:
            raise HeadersTooLarge(f"more than {max_headers} header fields")
        got = _Fields()
        parser = httptools.HttpResponseParser(got)
        try:
            parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError as e:
            pure_response(head, max_headers=max_headers)
            _disagree("llhttp refuses a response meshd accepts", head, e)
            raise BadRequest(f"llhttp: {e}") from None
        if not got.done:
            raise BadRequest("llhttp: incomplete head")
        version = b"HTTP/" + parser.get_http_version().encode()
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise BadRequest("malformed status line")
        # meshd's rules from here, as in meshd.proto.http1._parse_response_head
        special = h._collect(got.headers)
        http11 = version == b"HTTP/1.1"
        tokens = h._tokens(special.get(b"connection"))
        keep_alive = h._keep_alive(http11, tokens)
        lengths = special.get(b"content-length")
        codings = special.get(b"transfer-encoding")
        content_length = None
        chunked = False
        if codings is not None:
            if not http11:
                raise BadRequest("Transfer-Encoding in an HTTP/1.0 response")
            names = h._codings(codings)
            if names[-1] == b"chunked":
                if names.count(b"chunked") > 1:
                    raise BadRequest("chunked applied more than once")
                chunked = True
            elif b"chunked" in names:
                raise BadRequest("chunked is not the final transfer coding")
            else:
                keep_alive = False
            if lengths is not None:
                keep_alive = False
        elif lengths is not None:
            if len(lengths) == 1 and b"," not in lengths[0]:
                content_length = h._content_length(lengths[0])
            else:
                values = {v.strip(b" \t") for field in lengths for v in field.split(b",")}
                if len(values) != 1:
                    raise BadRequest("conflicting Content-Length values")
                content_length = h._content_length(values.pop())
        return h.ResponseHead(
            version=version, status=parser.get_status_code(), reason=got.reason,
            headers=got.headers, content_length=content_length, chunked=chunked,
            keep_alive=keep_alive, connection_tokens=tokens)

    return parse_request_head, parse_response_head


def install() -> None:
    """Replace meshd's parsers in this process (before anything binds them)."""
    from meshd.proto import http1

    http1.parse_request_head, http1.parse_response_head = make_parsers()


def run_time() -> None:
    import httptools

    from meshd.proto import http1

    request, response = make_parsers()

    def best(fn: Any, n: int = 20000, rounds: int = 7) -> float:
        b = float("inf")
        for _ in range(rounds):
            t = time.process_time()
            for _ in range(n):
                fn()
            b = min(b, time.process_time() - t)
        return b / n * 1e6

    def alone(data: bytes) -> None:
        httptools.HttpRequestParser(_Fields()).feed_data(data)

    kept = _Fields()
    reused = httptools.HttpRequestParser(kept)

    def alone_reused() -> None:  # one parser per connection: llhttp resets after each message
        kept.url, kept.headers, kept.done = b"", [], False
        reused.feed_data(REQUEST)

    rows = [
        ("meshd parse_request_head, wrk's head", lambda: http1.parse_request_head(REQUEST)),
        ("llhttp + meshd's rules, wrk's head", lambda: request(REQUEST)),
        ("llhttp alone, wrk's head (new parser)", lambda: alone(REQUEST)),
        ("llhttp alone, wrk's head (reused parser)", alone_reused),
        ("meshd parse_request_head, 6 fields", lambda: http1.parse_request_head(REQUEST6)),
        ("llhttp + meshd's rules, 6 fields", lambda: request(REQUEST6)),
        ("llhttp alone, 6 fields (new parser)", lambda: alone(REQUEST6)),
        ("meshd parse_response_head, nginx's head", lambda: http1.parse_response_head(RESPONSE)),
        ("llhttp + meshd's rules, nginx's head", lambda: response(RESPONSE)),
    ]
    for name, fn in rows:
        print(f"{name:44s} {best(fn):6.2f} µs")


def run_tests(files: list[str], httptools_dir: str) -> int:
    with tempfile.TemporaryDirectory(prefix="meshd-httptools-") as tmp:
        (Path(tmp) / "sitecustomize.py").write_text(SITECUSTOMIZE)
        log = Path(tmp) / "disagreements.jsonl"
        log.touch()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (tmp, httptools_dir, str(ROOT)) if p)
        env[ENV] = str(log)
        rc = subprocess.run([str(Path(sys.executable).parent / "pytest"), "-q",
                             "-p", "no:cacheprovider", *files], cwd=ROOT, env=env,
                            timeout=1800).returncode
        seen: collections.Counter[tuple[str, str]] = collections.Counter()
        examples: dict[tuple[str, str], str] = {}
        for line in log.read_text().splitlines():
            kind, head, err = json.loads(line)
            seen[kind, err] += 1
            examples.setdefault((kind, err), head)
        print("\ndisagreements (llhttp refused, meshd's parser accepted):")
        for (kind, err), n in seen.most_common():
            print(f"  {n:4d}  {kind}: {err}  e.g. {examples[kind, err][:60]!r}")
        return rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--httptools", default="", help="directory httptools is installed in")
    ap.add_argument("mode", choices=("time", "tests"))
    ap.add_argument("files", nargs="*", default=["tests/test_http1.py"])
    args = ap.parse_args()
    if args.httptools:
        sys.path.insert(0, args.httptools)
    if args.mode == "time":
        run_time()
        return 0
    return run_tests(args.files, args.httptools)


if __name__ == "__main__":
    sys.exit(main())
