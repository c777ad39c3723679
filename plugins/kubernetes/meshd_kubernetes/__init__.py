"""The ``kubernetes`` discovery plugin: endpoints from EndpointSlices, listed then watched.

```toml
[[discovery]]
name = "k8s"
plugin = "kubernetes"
# In a pod nothing else is needed: the API server comes from KUBERNETES_SERVICE_HOST/PORT,
# the token, CA and namespace from /var/run/secrets/kubernetes.io/serviceaccount/.
# api_server = "https://10.0.0.1:443"   # outside a pod (or kubeconfig = "~/.kube/config")
# token_file = "/etc/meshd/k8s.token"   # re-read every minute and after a 401
# ca_file = "/etc/meshd/k8s-ca.crt"
namespace = "default"          # for bare names; "web.ns", "web.ns.svc.cluster.local" resolve too
# port = "http"                # the slice port to use (default: the first); or "web:http"
# timeout = "10s"              # per request (connect, and reads of a list)
# watch_timeout = "5m"         # timeoutSeconds of one watch request, then re-watch
# meshed_label = "meshd.io/meshed"       # a Service label (copied to its slices) = "true"
# inbound_port_name = "meshd-inbound"    # the slice port of meshd's inbound listener
# service_account_label = "meshd.io/service-account"  # a Service label: the pods' service
#                              # account; meshed endpoints then expect (mTLS) the identity
#                              # spiffe://<trust_domain>/ns/<namespace>/sa/<account>
# trust_domain = "cluster.local"         # of those identities
# cluster_domain = "cluster.local"
```

How one service is watched (the API's "efficient detection of changes"): list its
EndpointSlices (``labelSelector=kubernetes.io/service-name=NAME``), then watch from the
list's ``resourceVersion`` with ``allowWatchBookmarks``. Every event updates the
per-slice state; when the merged endpoint set changes a ``Reset`` is yielded (the
ready rule is in ``slices.py``). A BOOKMARK only advances the resourceVersion. A stream
the server ends (timeoutSeconds, or a dropped connection) is re-watched from the last
resourceVersion, so no event is lost; 410 Gone (HTTP status, or an ERROR event with
code 410) means the history is gone: re-list. Other errors raise; meshd keeps the last
endpoints and restarts the watch with backoff. No slices and no Service (404) is
``NoSuchService``; a Service without ready endpoints is ``Reset(())``.

Expected identities: with ``[identity]`` set, meshd uses mTLS to a meshed endpoint only
when discovery gives it an identity. A meshed Service labelled
``meshd.io/service-account: <account>`` (``service_account_label``) gives its endpoints
``spiffe://<trust_domain>/ns/<namespace>/sa/<account>``; without that label they have
none and are reached over plaintext h2c (see ``slices.py``).

The same distribution publishes the ``kubernetes`` config source (entry-point group
``meshd.config``): routes from Gateway API HTTPRoutes and GRPCRoutes, in
``config_source.py`` (reading) and ``routes.py`` (translating); it reuses this class for
its connection options.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from meshd.config import parse_duration
from meshd.discovery import Backend, NoSuchService, Reset, Update
from meshd.errors import ConfigError
from meshd.identity.spiffe import trust_domain_problem
from meshd_kubernetes import kubeconfig
from meshd_kubernetes.client import Client, Gone, KubernetesError, Settings, StreamBroken
from meshd_kubernetes.slices import (
    SERVICE_NAME_LABEL,
    Options,
    ServiceRef,
    dns_label,
    endpoints,
    parse_service,
)

__all__ = ["KubernetesBackend", "KubernetesError"]

log = logging.getLogger("meshd.discovery.kubernetes")

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
_STRING_KEYS = ("api_server", "token_file", "ca_file", "kubeconfig", "namespace", "port",
                "meshed_label", "inbound_port_name", "cluster_domain",
                "service_account_label", "trust_domain")
_KEYS = {*_STRING_KEYS, "timeout", "watch_timeout"}


class KubernetesBackend(Backend):
    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        super().__init__(name, options)
        problems: list[tuple[str, str]] = []
        problems += [(k, "unknown key") for k in options if k not in _KEYS]
        for key in _STRING_KEYS:
            if key in options and (not isinstance(options[key], str) or not options[key]):
                problems.append((key, f"expected a non-empty string, got {options[key]!r}"))
        opt: dict[str, str] = {k: v for k, v in options.items()
                               if k in _STRING_KEYS and isinstance(v, str) and v}
        self.timeout = self._duration(options, "timeout", "10s", 0.1, problems)
        self.watch_timeout = max(1, int(self._duration(options, "watch_timeout", "5m", 1.0,
                                                       problems)))
        if "kubeconfig" in opt:
            for other in ("api_server", "token_file", "ca_file"):
                if other in opt:
                    problems.append((other, "not with kubeconfig (which says where and how "
                                            "to connect)"))
        for key in ("namespace", "port"):
            if key in opt and not dns_label(opt[key]):
                problems.append((key, f"not a valid Kubernetes name: {opt[key]!r}"))
        if "trust_domain" in opt and (why := trust_domain_problem(opt["trust_domain"])):
            problems.append(("trust_domain", why))
        server = opt.get("api_server")
        if server is not None and not server.startswith(("https://", "http://")):
            problems.append(("api_server", f"expected an http(s) URL, got {server!r}"))
        if server is None and "kubeconfig" not in opt:
            host = os.environ.get("KUBERNETES_SERVICE_HOST")
            if not host:
                problems.append(("api_server", "not set, and KUBERNETES_SERVICE_HOST is not in "
                                               "the environment (outside a pod, set api_server "
                                               "or kubeconfig)"))
            else:
                port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
                server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        if problems:
            raise ConfigError(problems)
        self._opt = opt
        self._server = server
        self._opts = Options(opt.get("port"), opt.get("meshed_label", "meshd.io/meshed"),
                             opt.get("inbound_port_name", "meshd-inbound"),
                             opt.get("service_account_label", "meshd.io/service-account"),
                             opt.get("trust_domain", "cluster.local"))
        self._settings: Settings | None = None
        self._namespace = ""
        self._lock = threading.Lock()
        self._clients: set[Client] = set()
        self._closed = threading.Event()

    @staticmethod
    def _duration(options: Mapping[str, Any], key: str, default: str, minimum: float,
                  problems: list[tuple[str, str]]) -> float:
        try:
            value = parse_duration(options.get(key, default))
        except ValueError as e:
            problems.append((key, str(e)))
            return parse_duration(default)
        if value < minimum:
            problems.append((key, f"must be at least {minimum:g}s"))
        return value

    def _resolve(self) -> Settings:
        """Settings and namespace, read from files on first use (never in __init__)."""
        with self._lock:
            if self._settings is None:
                opt = self._opt
                if "kubeconfig" in opt:
                    settings = kubeconfig.load(os.path.expanduser(opt["kubeconfig"]))
                else:
                    assert self._server is not None
                    ca = opt.get("ca_file") or os.path.join(SA_DIR, "ca.crt")
                    settings = Settings(
                        server=self._server.rstrip("/"),
                        ca_file=ca if "ca_file" in opt or os.path.exists(ca) else None,
                        token_file=opt.get("token_file") or os.path.join(SA_DIR, "token"),
                        token_file_required="token_file" in opt)
                namespace = opt.get("namespace") or settings.namespace
                if namespace is None:
                    try:
                        with open(os.path.join(SA_DIR, "namespace"), encoding="utf-8") as f:
                            namespace = f.read().strip() or "default"
                    except OSError:
                        namespace = "default"
                self._namespace = namespace
                self._settings = settings
            return self._settings

    def watch(self, service: str) -> Iterator[Update]:
        settings = self._resolve()
        ref = parse_service(service, self._namespace,
                            self._opt.get("cluster_domain", "cluster.local"))
        if ref is None:  # not a name Kubernetes could have; it will not appear later
            yield NoSuchService()
            self._closed.wait()
            return
        client = Client(settings, self.timeout)
        with self._lock:
            if self._closed.is_set():
                return
            self._clients.add(client)
        try:
            yield from _ServiceWatch(client, ref, self._opts, self.watch_timeout).run()
        except KubernetesError:
            if not client.closed:
                raise
        finally:
            with self._lock:
                self._clients.discard(client)
            client.close()

    def close(self) -> None:
        """End every running watch promptly (open streams are shut down)."""
        with self._lock:
            self._closed.set()
            clients = list(self._clients)
        for c in clients:
            c.close()


class _ServiceWatch:
    """The list-then-watch loop of one service, with its per-slice state."""

    def __init__(self, client: Client, ref: ServiceRef, opts: Options,
                 watch_timeout: int) -> None:
        self.client = client
        self.ref = ref
        self.opts = opts
        self.watch_timeout = watch_timeout
        ns = ref.namespace
        self.path = f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"
        self.params = {"labelSelector": f"{SERVICE_NAME_LABEL}={ref.name}"}
        self.slices: dict[str, Mapping[str, Any]] = {}
        self.last: Update | None = None

    def run(self) -> Iterator[Update]:
        ns = self.ref.namespace
        rv: str | None = None
        quick_ends = broken = 0
        while not self.client.closed:
            if rv is None:
                body = self.client.get(self.path, self.params,
                                       f"listing endpointslices in ns {ns}")
                rv = str((body.get("metadata") or {}).get("resourceVersion") or "")
                self.slices = {_name(item): item for item in body.get("items") or ()}
                yield from self._changed()
            started, events = time.monotonic(), 0
            stream = self.client.watch(self.path, {**self.params, "resourceVersion": rv},
                                       f"watching endpointslices in ns {ns}", self.watch_timeout)
            try:
                for event in stream:
                    events += 1
                    rv = self._event(event, rv)
                    yield from self._changed()
            except Gone:
                log.info("kubernetes: history expired watching %s; listing again", self.ref)
                rv = None
                continue
            except StreamBroken as e:
                broken = broken + 1 if events == 0 else 1
                if broken > 1:  # twice in a row without an event: let meshd back off
                    raise
                log.info("kubernetes: %s; watching %s again from %s", e, self.ref, rv)
            else:
                broken = 0
            finally:
                stream.close()  # the response, when the loop left early
            # The stream ended: re-watch from rv. A server ending streams at once would spin.
            quick_ends = quick_ends + 1 if events == 0 and time.monotonic() - started < 0.5 else 0
            if quick_ends >= 3:
                raise KubernetesError(f"kubernetes {self.client.s.server}: watch streams of "
                                      f"endpointslices in ns {ns} end as soon as they start")

    def _event(self, event: Mapping[str, Any], rv: str) -> str:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone(f"kubernetes: {obj.get('message', 'resourceVersion too old')}", 410)
            raise KubernetesError(
                f"kubernetes {self.client.s.server}: {obj.get('code')} {obj.get('reason')} "
                f"watching endpointslices in ns {self.ref.namespace}: {obj.get('message')}",
                int(obj.get("code") or 0))
        new_rv = str((obj.get("metadata") or {}).get("resourceVersion") or rv)
        if kind in ("ADDED", "MODIFIED"):
            self.slices[_name(obj)] = obj
        elif kind == "DELETED":
            self.slices.pop(_name(obj), None)
        return new_rv  # BOOKMARK: only this

    def _changed(self) -> Iterator[Update]:
        update: Update = Reset(endpoints(self.slices.values(), self.ref, self.opts))
        if not self.slices:
            ns, name = self.ref.namespace, self.ref.name
            if not self.client.exists(f"/api/v1/namespaces/{ns}/services/{name}",
                                      f"getting service {name} in ns {ns}"):
                update = NoSuchService()
        if update != self.last:
            self.last = update
            yield update


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")
