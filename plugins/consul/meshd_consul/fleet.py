"""The ``consul`` config source: routes, splits and failover from Consul's config entries.

```toml
[[config_source]]
name = "consul"
plugin = "consul"
address = "http://127.0.0.1:8500"        # the local agent; https with ca_file/cert_file/key_file
token_file = "/etc/meshd/consul.token"   # optional; re-read on every request
datacenter = "dc1"                       # optional: the agent's; "web@dc2" names another
wait = "5m"                              # blocking-query wait (Consul caps it at 10m)
timeout = "10s"                          # per request, on top of wait + wait/16
min_interval = "100ms"                   # token bucket (burst 2) between queries of a kind
```

``watch("web")`` yields ``service-router/web``, ``service-splitter/web`` and
``service-resolver/web`` in meshd's terms (``config_entries``), each time one changes,
and ``Clear`` for a kind the service has no entry of. A malformed entry (one Consul took
but meshd cannot apply faithfully) is ``Refused``, naming the field.

One blocking query per kind, ``GET /v1/config/<kind>``, serves every watched service:
Consul keeps config entries in one table whose index every write moves, so a blocking
query on one entry (``/v1/config/<kind>/<name>``) wakes on any entry's write anyway, and
one query per service and kind would hold three agent connections per service (an
agent allows ``http_max_conns_per_client`` = 200 by default). The three queries start
with the first watch and follow Consul's blocking-query rules as the discovery plugin
does (``entries.next_index``, a token bucket); a change reaches every watch of the
services it touched, and only those yield.

A service of another datacenter (``web@dc2``: a failover target) gets the subsets of
its resolver (entries are global in Consul, replicated from the primary datacenter) and
no routes, split or failover of its own, so that a failover into dc2 stays in dc2.

Errors (agent unreachable, 5xx, ACL) make the watches raise ``ConsulError`` (meshd keeps
their last parts and restarts them with backoff) while the kind's query keeps retrying.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import requests

from meshd.errors import ConfigError
from meshd.fleet.api import Clear, Refused, Set, Source, Update
from meshd_consul import ConsulError
from meshd_consul.config_entries import (
    KINDS,
    RESOLVER,
    ROUTER,
    SPLITTER,
    EntryError,
    entry_name,
    resolver,
    router,
    splitter,
)
from meshd_consul.entries import TokenBucket, next_index
from meshd_consul.options import ConsulOptions, parse_options, split_service

log = logging.getLogger("meshd.config.consul")

# The [[discovery]] keys that mean something here (the rest select endpoints).
_KEYS = ("address", "token_file", "datacenter", "wait", "timeout", "ca_file", "cert_file",
         "key_file", "verify", "min_interval")
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0
_ABSENT = object()


class _Kind:
    """The entries of one kind, kept by one blocking query."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.entries: dict[str, dict[str, Any]] = {}   # name -> entry
        self.synced = False
        self.error: str | None = None
        self.thread: threading.Thread | None = None


class ConsulConfigSource(Source):
    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        super().__init__(name, options)
        problems = [(k, f"unknown key (known: {', '.join(_KEYS)})") for k in options
                    if k not in _KEYS]
        try:
            self.opts: ConsulOptions = parse_options({k: v for k, v in options.items()
                                                      if k in _KEYS})
        except ConfigError as e:
            problems = list(e.problems) + problems
        if problems:   # every problem at once, as meshd check shows them
            raise ConfigError(problems)
        self._cond = threading.Condition()
        self._closed = False
        self._waiters: dict[str, set[threading.Event]] = {}   # entry name -> its watches
        self._kinds = {kind: _Kind(kind) for kind in KINDS}
        self._session: requests.Session | None = None

    # -- the watch ------------------------------------------------------------------------

    def watch(self, service: str) -> Iterator[Update]:
        name, dc = split_service(service, self.opts.datacenter)
        remote = "@" in service and dc != self.opts.datacenter
        self._start()
        last: dict[str, object] = dict.fromkeys(KINDS, _ABSENT)
        woken = threading.Event()   # set when an entry of this name changes, or all are woken
        woken.set()
        with self._cond:
            self._waiters.setdefault(name, set()).add(woken)
        try:
            yield from self._follow(name, remote, woken, last)
        finally:
            with self._cond:
                waiters = self._waiters.get(name, set())
                waiters.discard(woken)
                if not waiters:
                    self._waiters.pop(name, None)

    def _follow(self, name: str, remote: bool, woken: threading.Event,
                last: dict[str, object]) -> Iterator[Update]:
        while True:
            woken.wait()
            woken.clear()
            with self._cond:
                if self._closed:
                    return
                state = {k: (s.synced, s.error, s.entries.get(name)) for k, s in self._kinds.items()}
            failing = [error for _, error, _ in state.values() if error is not None]
            if failing:   # meshd keeps the last parts and restarts the watch with backoff
                raise ConsulError(failing[0])
            for kind, (synced, _error, entry) in state.items():
                if not synced or (remote and kind != RESOLVER) or entry is last[kind]:
                    continue
                if last[kind] is not _ABSENT and entry == last[kind]:
                    last[kind] = entry
                    continue
                last[kind] = entry
                yield self._update(kind, name, entry, remote)
            if remote and last[ROUTER] is _ABSENT:   # said once: nothing of these kinds
                last[ROUTER] = last[SPLITTER] = None
                yield Clear("routes")
                yield Clear("split")

    def _update(self, kind: str, name: str, entry: dict[str, Any] | None, remote: bool) -> Update:
        part_kind = KINDS[kind]
        if entry is None:
            return Clear(part_kind)  # type: ignore[arg-type]
        try:
            if kind == ROUTER:
                return Set(router(entry, name))
            if kind == SPLITTER:
                return Set(splitter(entry, name))
            part = resolver(entry, name, self.opts.datacenter)
            if remote:
                part = type(part)(part.entry, part.subsets, part.default_subset, (),
                                  part.connect_timeout, part.timeout)
            return Set(part)
        except EntryError as e:
            return Refused(part_kind, entry_name(kind, name), str(e))  # type: ignore[arg-type]

    # -- the queries, one per kind --------------------------------------------------------

    def _start(self) -> None:
        with self._cond:
            for state in self._kinds.values():
                if state.thread is None and not self._closed:
                    state.thread = threading.Thread(target=self._kind_loop, args=(state,),
                                                    name=f"consul-config-{state.kind}", daemon=True)
                    state.thread.start()

    def _kind_loop(self, state: _Kind) -> None:
        index, failures = 0, 0
        bucket = TokenBucket(self.opts.min_interval, now=time.monotonic())
        while not self._closed:
            delay = bucket.reserve(time.monotonic())
            if delay:
                time.sleep(delay)
            try:
                returned, entries = self._list(state.kind, index)
            except ConsulError as e:
                if self._closed:
                    return
                failures += 1
                with self._cond:
                    if state.error != str(e):
                        log.warning("%s", e)
                        state.error = str(e)
                        self._wake(None)
                time.sleep(min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(failures, 10))
                           * random.uniform(0.5, 1.0))
                index = 0
                continue
            failures = 0
            new_index = next_index(index, returned)
            if new_index == 0 and index:
                index = 0   # went backwards (a snapshot restore): read again in full
                continue
            index = new_index
            by_name = {e["Name"]: e for e in entries
                       if isinstance(e, dict) and isinstance(e.get("Name"), str)}
            with self._cond:
                if not state.synced or state.error is not None:
                    state.entries, state.synced, state.error = by_name, True, None
                    self._wake(None)
                elif by_name != state.entries:
                    old, state.entries = state.entries, by_name
                    self._wake({n for n in old.keys() | by_name.keys()
                                if old.get(n) != by_name.get(n)})

    def _wake(self, names: set[str] | None) -> None:
        """Wake the watches of ``names`` (None: all of them). Under ``_cond``."""
        for name, waiters in self._waiters.items():
            if names is None or name in names:
                for woken in waiters:
                    woken.set()

    def _list(self, kind: str, index: int) -> tuple[int, list[Any]]:
        o = self.opts
        params: dict[str, str] = {}
        if index:
            params.update(index=str(index), wait=f"{o.wait:g}s")
        if o.datacenter:
            params["dc"] = o.datacenter
        headers = {}
        token = self._token()
        if token:
            headers["X-Consul-Token"] = token
        url = f"{o.scheme}://{o.host}:{o.port}/v1/config/{kind}"
        what = f"config/{kind}"
        try:
            r = self._http().get(url, params=params, headers=headers,
                                 timeout=(o.timeout, o.wait + o.wait / 16 + o.timeout))
        except requests.RequestException as e:
            raise ConsulError(f"consul {o.agent}: unreachable for {what} "
                              f"({type(e).__name__})") from None
        if r.status_code == 403:
            raise ConsulError(f"consul {o.agent}: ACL denied for {what} "
                              f"(403 {r.text.strip()[:200]})")
        if r.status_code != 200:
            raise ConsulError(f"consul {o.agent}: {what} failed ({r.status_code} "
                              f"{r.text.strip()[:200]})")
        try:
            returned = int(r.headers.get("X-Consul-Index", ""))
            data = r.json()
        except ValueError:
            raise ConsulError(f"consul {o.agent}: bad answer for {what} (no X-Consul-Index "
                              "or not JSON)") from None
        if not isinstance(data, list):
            raise ConsulError(f"consul {o.agent}: bad answer for {what} (not a list)")
        return returned, data

    def _http(self) -> requests.Session:
        if self._session is None:
            o = self.opts
            s = requests.Session()
            s.verify = (o.ca_file or True) if o.verify else False
            if o.cert_file:
                s.cert = (o.cert_file, o.key_file)
            self._session = s
        return self._session

    def _token(self) -> str | None:
        path = self.opts.token_file
        if not path:
            return None
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().strip() or None
        except OSError as e:
            raise ConsulError(f"consul token_file {path}: {e.strerror}") from None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._wake(None)
        if self._session is not None:
            self._session.close()
