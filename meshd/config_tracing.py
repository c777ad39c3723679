"""The config of distributed tracing: ``[tracing]`` (CONTRACT, "Observability").

``otlp_endpoint`` is where each worker POSTs its spans (OTLP/HTTP, protobuf): an
``http://`` URL with a host, an optional port (default 4318) and a path (default
``/v1/traces``). ``sample_rate`` (0..1) is the share of the traces meshd starts that
it records; a request that comes with a trace context keeps its own sampled flag.
``propagation`` names the header formats read and written: "w3c" (``traceparent``,
``tracestate``) and "b3" (``b3``, ``X-B3-*``). The rest bound the exporter: spans held
per worker (``queue``), spans per POST (``batch_size``), how long a POST may take
(``export_timeout``). Checked wherever the config is read (``meshd check``, start, HUP).
The table absent: no tracing, and nothing on the request path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from meshd.config_table import Problems, Table, default, duration, integer, show, string

FORMATS = ("w3c", "b3")
_SERVICE_NAME = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,127}")  # printable ASCII, 128 at most


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """``[tracing]``: a span per request per hop (``meshd.worker.tracing``)."""
    otlp_endpoint: str = "http://127.0.0.1:4318/v1/traces"
    sample_rate: float = 0.01
    propagation: tuple[str, ...] = FORMATS
    service_name: str = ""        # "": the config's ``instance``
    batch_size: int = 512         # spans per export request at most
    queue: int = 2048             # spans a worker holds for its exporter; more are dropped
    export_timeout: float = 5.0   # one export request, connect to answer
    # (host, port, path) of otlp_endpoint, split once here
    target: tuple[str, int, str] = ("127.0.0.1", 4318, "/v1/traces")


def _rate(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number between 0 and 1, got {show(value)}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be between 0 and 1, got {value}")
    return float(value)


def _formats(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f'expected a non-empty list of "w3c", "b3", got {show(value)}')
    for v in value:
        if v not in FORMATS:
            raise ValueError(f'expected "w3c" or "b3", got {show(v)}')
    if len(set(value)) != len(value):
        raise ValueError(f"a format is named twice: {value!r}")
    return tuple(value)


def split_endpoint(url: str) -> tuple[str, int, str]:
    """(host, port, path) of an ``http://`` OTLP endpoint; ValueError says what is wrong."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"not a URL: {e}") from None
    if parts.scheme != "http":
        raise ValueError(f'expected an http:// URL (https is not supported), got {url!r}')
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    if parts.username or parts.password or parts.fragment:
        raise ValueError(f"expected http://HOST[:PORT]/PATH, got {url!r}")
    path = parts.path or "/v1/traces"
    if parts.query:
        path += "?" + parts.query
    if any(c in path for c in " \r\n\t"):
        raise ValueError(f"whitespace in the path of {url!r}")
    return parts.hostname, port or 4318, path


def tracing(raw: object, instance: str, problems: Problems) -> TracingConfig | None:
    """``[tracing]``, or None when the table is absent. ``instance``: the default
    ``service_name``."""
    if raw is None:
        return None
    t = Table(raw, "tracing", problems)
    endpoint = t.field(TracingConfig, "otlp_endpoint", string())
    rate = t.field(TracingConfig, "sample_rate", _rate)
    formats = t.field(TracingConfig, "propagation", _formats)
    name = t.take("service_name", string(_SERVICE_NAME), instance)
    batch = t.field(TracingConfig, "batch_size", integer(1, 10_000))
    queue = t.field(TracingConfig, "queue", integer(16, 1_000_000))
    timeout = t.field(TracingConfig, "export_timeout", duration(0.01))
    t.finish()
    target = default(TracingConfig, "target")
    try:
        target = split_endpoint(endpoint)
    except ValueError as e:
        problems.append(("tracing.otlp_endpoint", str(e)))
    return TracingConfig(otlp_endpoint=endpoint, sample_rate=rate, propagation=formats,
                         service_name=name, batch_size=batch, queue=queue,
                         export_timeout=timeout, target=target)
