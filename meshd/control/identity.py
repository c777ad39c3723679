"""Running the identity provider in the control process and publishing what it yields.

With ``[identity]`` set, the control process loads the provider class from the
``meshd.identity`` entry points, constructs it (``Provider(options, settings)``; the same
construction already passed in the config check) and iterates its ``watch()`` in a
greenlet. Each Material is checked (``meshd.identity.material.check``); a good one is
published to ``meshd.identity.paths(shm_dir, instance, master_pid)``: the roots first,
then the chain and key, each written 0600 at a temporary name and renamed into place in
the private ``shm_dir`` (``meshd.private_files.write_atomic``), so a worker that sees a
new pem file reads roots at least as new. Workers build their TLS contexts from those
files (``meshd.worker.identity``).

Fail static: a refused Material (key of another pair, expired, wrong trust domain...)
is logged with the provider's distribution and the last good one stays published; a
``watch`` that raises or ends is restarted with jittered backoff; a publish that fails
(ENOSPC...) is retried with backoff. Nothing logged here ever holds key bytes:
``Material``'s repr hides the key and ``material.check``'s reasons never quote it.
"""

from __future__ import annotations

import datetime
import logging
import random
import time
from collections.abc import Iterable
from typing import Any

import gevent
import gevent.event

from meshd.config import Config
from meshd.control.counters import COUNTERS
from meshd.errors import ConfigError, MeshdError
from meshd.identity import IdentityPaths
from meshd.identity.api import Material, Settings
from meshd.identity.material import Checked, MaterialError, check
from meshd.identity.registry import PluginInfo
from meshd.identity.registry import load as load_provider
from meshd.private_files import read_trusted, write_atomic

log = logging.getLogger("meshd.control")

BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0       # a watch that failed, a publish that failed
WAITING_LOG_INTERVAL = 10.0               # "waiting for material" while there is none
NOT_YET_VALID_RETRY = 3600.0              # a leaf valid within this is offered again then
EXPIRY_CHECK_INTERVAL = 60.0
EXPIRY_WARN_FRACTION = 0.1                # warn when less than this much of its life is left


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds")


class IdentityRunner:
    """The provider of ``[identity]``, its watch greenlet and the published files."""

    def __init__(self, cfg: Config, paths: IdentityPaths) -> None:
        assert cfg.identity is not None
        self.ident = cfg.identity
        self.paths = paths
        self.settings = Settings(trust_domain=cfg.identity.trust_domain,
                                 instance=cfg.instance, state_dir=cfg.state_dir)
        self.provider: Any = None
        self.info: PluginInfo | None = None
        self.current: Checked | None = None       # what is published now
        self.published = gevent.event.Event()     # set once the first material is out
        self.published_total = 0
        self.refused_total = 0
        self.watch_failures_total = 0
        self.error: str | None = None             # the last refusal or failure, until a publish
        self._greenlet: gevent.Greenlet | None = None
        self._offered = 0                         # materials offered: a retry of an older one
                                                  # is dropped once a newer one came

    def describe_provider(self) -> str:
        info = self.info
        return (f"provider {info.name} ({info.distribution} {info.version})" if info is not None
                else f"provider {self.ident.provider} (not loaded)")

    # -- running ------------------------------------------------------------------------

    def start(self) -> None:
        try:
            cls, self.info = load_provider(self.ident.provider)
            self.provider = cls(self.ident.options, self.settings)
        except ConfigError as e:
            self.error = "; ".join(f"identity.{k}: {m}" if k else m for k, m in e.problems)
        except MeshdError as e:
            self.error = str(e)
        except Exception as e:   # a constructor raising something else: the plugin's bug
            self.error = f"{type(e).__name__}: {e}"
        if self.provider is None:
            log.error("identity: %s cannot start: %s; no identity will be published",
                      self.describe_provider(), self.error)
            return
        self._greenlet = gevent.spawn(self._watch_loop)
        gevent.spawn(self._waiting_loop)
        gevent.spawn(self._expiry_loop)

    def _watch_loop(self) -> None:
        failures = 0
        while True:
            try:
                for material in self.provider.watch():
                    self.offer(material)
                    failures = 0
                log.warning("identity: %s: watch() ended; restarting it",
                            self.describe_provider())
            except Exception as e:
                failures += 1
                self.watch_failures_total += 1
                COUNTERS.add(WATCH_FAILURES)
                self.error = f"watch failed: {type(e).__name__}: {e}"
                log.error("identity: %s: %s; %s", self.describe_provider(), self.error,
                          self._keeping())
            delay = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(failures, 10))
            gevent.sleep(delay * random.uniform(0.5, 1.0))

    def _waiting_loop(self) -> None:
        """Say, now and then, why there is no identity yet (workers wait for it)."""
        while not self.published.wait(WAITING_LOG_INTERVAL):
            why = self.error or getattr(self.provider, "error", None) or "nothing yielded yet"
            log.warning("identity: waiting for material from %s: %s", self.describe_provider(),
                        why)

    def _expiry_loop(self) -> None:
        """Warn while the published leaf nears its end and no newer one came (the
        provider is stuck): peers refuse it once expired."""
        while True:
            gevent.sleep(EXPIRY_CHECK_INTERVAL)
            c = self.current
            if c is None:
                continue
            left = c.not_after - time.time()
            if left < (c.not_after - c.not_before) * EXPIRY_WARN_FRACTION:
                state = "expired" if left < 0 else f"expires in {left:.0f}s"
                log.warning("identity: the published certificate %s %s (%s) and %s has given "
                            "no newer one%s", c.spiffe_id, state, _when(c.not_after),
                            self.describe_provider(),
                            f" (last error: {self.error})" if self.error else "")

    def offer(self, material: Material) -> bool:
        """Check ``material`` and publish it; False when refused (logged, last good kept)."""
        self._offered += 1
        if not isinstance(material, Material):
            self.refused_total += 1
            COUNTERS.add(REFUSED)
            self.error = f"watch() yielded {type(material).__name__}, not a Material"
            log.error("identity: refused material from %s: %s; %s", self.describe_provider(),
                      self.error, self._keeping())
            return False
        try:
            checked = check(material, self.ident.trust_domain)
        except MaterialError as e:
            self.refused_total += 1
            COUNTERS.add(REFUSED)
            self.error = f"refused: {e}"
            retry = ""
            if e.valid_from is not None and e.valid_from - time.time() < NOT_YET_VALID_RETRY:
                # The provider yields on change only: without this, a leaf issued by a
                # clock ahead of ours would wait for the next rotation.
                delay = max(0.0, e.valid_from - time.time()) + 0.5
                gevent.spawn_later(delay, self._retry, material, self._offered)
                retry = f"; offered again in {delay:.1f}s"
            log.error("identity: refused material from %s: %s; %s%s", self.describe_provider(),
                      e, self._keeping(), retry)
            return False
        except Exception as e:   # a provider's odd values (str for bytes...) are refusals too
            self.refused_total += 1
            COUNTERS.add(REFUSED)
            self.error = f"refused: cannot check it: {type(e).__name__}: {e}"
            log.error("identity: refused material from %s: %s; %s", self.describe_provider(),
                      self.error, self._keeping())
            return False
        self._publish(material, checked)
        return True

    def _retry(self, material: Material, offered: int) -> None:
        if self._offered == offered:   # nothing newer came meanwhile
            self.offer(material)

    def _publish(self, material: Material, checked: Checked) -> None:
        chain = material.chain_pem if material.chain_pem.endswith(b"\n") else material.chain_pem + b"\n"
        pem = chain + material.key_pem
        failures = 0
        while True:
            try:
                if self._published_already(pem, material.roots_pem):
                    if self.current == checked:   # a restarted watch yields what it had
                        self.error = None
                        return
                else:
                    write_atomic(self.paths.roots, material.roots_pem)   # roots first: paths()
                    write_atomic(self.paths.pem, pem)
                break
            except OSError as e:
                failures += 1
                self.error = f"cannot publish to {self.paths.pem}: {e.strerror or e}"
                if failures == 1 or failures % 10 == 0:
                    log.error("identity: %s; %s, retrying", self.error, self._keeping())
                delay = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(failures, 10))
                gevent.sleep(delay * random.uniform(0.5, 1.0))
        self.current = checked
        self.published_total += 1
        COUNTERS.add(PUBLISHED)
        self.error = None
        self.published.set()
        log.info("identity: published %s (expires %s, serial %s; %s)", checked.spiffe_id,
                 _when(checked.not_after), checked.serial, self.describe_provider())

    def _published_already(self, pem: bytes, roots: bytes) -> bool:
        """The files hold this material already (the previous generation's control
        process published it): rewriting would make every worker reload for nothing."""
        try:
            return read_trusted(self.paths.pem) == pem and read_trusted(self.paths.roots) == roots
        except OSError:
            return False

    def _keeping(self) -> str:
        c = self.current
        if c is None:
            return "no identity published yet"
        return f"keeping {c.spiffe_id} (expires {_when(c.not_after)})"

    def close(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
        closer = getattr(self.provider, "close", None)
        if callable(closer):
            try:
                closer()
            except Exception as e:
                log.warning("identity: closing %s: %s", self.describe_provider(), e)

    # -- reporting ----------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What admin /identity shows (never key material)."""
        c = self.current
        return {
            "provider": self.ident.provider,
            "distribution": self.describe_provider(),
            "trust_domain": self.ident.trust_domain,
            "local_id": c.spiffe_id if c else None,
            "serial": c.serial if c else None,
            "not_before": _when(c.not_before) if c else None,
            "not_after": _when(c.not_after) if c else None,
            "expires_in_s": round(c.not_after - time.time(), 1) if c else None,
            "roots": list(c.roots) if c else [],
            "published": {"pem": self.paths.pem, "roots": self.paths.roots,
                          "total": self.published_total},
            "refused_total": self.refused_total,
            "watch_failures_total": self.watch_failures_total,
            "last_error": self.error or getattr(self.provider, "error", None),
        }

    def prometheus(self) -> Iterable[str]:
        yield ("# HELP meshd_identity_cert_expiration_timestamp_seconds When the published "
               "workload certificate expires (unix time).")
        yield "# TYPE meshd_identity_cert_expiration_timestamp_seconds gauge"
        c = self.current
        if c is not None:
            yield (f'meshd_identity_cert_expiration_timestamp_seconds{{identity="{_esc(c.spiffe_id)}"}} '
                   f"{c.not_after:.0f}")
        yield "# HELP meshd_identity_published_total Materials published to the workers."
        yield "# TYPE meshd_identity_published_total counter"
        yield f"{PUBLISHED} {COUNTERS.value(PUBLISHED)}"
        yield "# HELP meshd_identity_refused_total Materials refused by the check (last good kept)."
        yield "# TYPE meshd_identity_refused_total counter"
        yield f"{REFUSED} {COUNTERS.value(REFUSED)}"
        yield "# HELP meshd_identity_watch_failures_total Provider watch() failures (restarted)."
        yield "# TYPE meshd_identity_watch_failures_total counter"
        yield f"{WATCH_FAILURES} {COUNTERS.value(WATCH_FAILURES)}"


# Counters kept in the region's control tables (meshd.control.counters).
PUBLISHED = "meshd_identity_published_total"
REFUSED = "meshd_identity_refused_total"
WATCH_FAILURES = "meshd_identity_watch_failures_total"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
