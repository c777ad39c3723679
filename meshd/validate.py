"""One validation for `meshd check`, `meshd run` and a reload (HUP): the config's own
keys, every discovery and config source's keys as its plugin validates them, the ``[identity]``
provider constructed with its options (keys under ``identity.``), and the TLS files of
``[service.NAME.tls]`` and ``[listener.tls]``. All three go through ``load_checked``, so they accept and refuse
the same configs with the same lines. ``run`` and HUP (``isolated``) make the plugin and
TLS checks in a short-lived forked child: the master never imports a plugin or ssl.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
import tomllib
from typing import Any

from meshd import config as config_mod
from meshd.config import Config
from meshd.config_env import expand_env
from meshd.config_identity import IdentityConfig, ListenerTlsConfig
from meshd.config_table import default
from meshd.discovery.registry import load as load_plugin
from meshd.errors import ConfigError, PluginError
from meshd.fleet.registry import load as load_config_source
from meshd.identity import spiffe
from meshd.identity.api import Settings
from meshd.identity.registry import load as load_provider

CHECK_TIMEOUT = 60.0   # seconds a forked check may take (plugin constructors do no I/O)


def load_checked(path: str, isolated: bool = False) -> Config:
    """The config at ``path``, with every discovery source's own keys validated by its
    plugin and every TLS file loaded, even when the rest of the config has problems too:
    every problem is reported at once. Raises ConfigError. `check`, `run` and a reload
    (HUP) all load through here, so they accept and refuse the same configs (a plugin
    that fails to import, a CA file that does not load included).

    ``isolated`` (the master, for `run` and HUP): those checks run in a forked child that
    exits after reporting its problems, and this process only parses (the same bytes):
    the plugins and ssl are never imported here, so the workers forked later patch the
    standard library with gevent before ssl is in their memory."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([("", f"cannot read: {e.strerror or e}")], path) from None
    if not isolated:
        return _checked(path, text)
    problems = _check_in_child(path, text)
    if problems:
        raise ConfigError(problems, path)
    return config_mod.load(path, text=text, check_files=False)


def _check_in_child(path: str, text: bytes) -> list[tuple[str, str]]:
    """Run :func:`_checked` in a forked child; its problems, as (key, message) pairs."""
    r, w = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: check, write the problems as JSON, exit without cleanup
        code = 0
        try:
            os.close(r)
            signal.set_wakeup_fd(-1)   # the master's wake-up pipe is not ours
            try:
                _checked(path, text)
                found: list[tuple[str, str]] = []
            except ConfigError as e:
                found = list(e.problems)
            except Exception as e:  # a plugin constructor raising something else
                found = [("", f"config check failed: {type(e).__name__}: {e}")]
            data = json.dumps(found).encode()
            while data:
                data = data[os.write(w, data):]
        except BaseException:
            code = 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(w)
    chunks: list[bytes] = []
    deadline = time.monotonic() + CHECK_TIMEOUT
    timed_out = True
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                ready, _, _ = select.select([r], [], [], left)
            except InterruptedError:
                continue
            if not ready:
                break
            chunk = os.read(r, 65536)
            if not chunk:
                timed_out = False
                break
            chunks.append(chunk)
    finally:
        os.close(r)
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    try:
        if os.waitstatus_to_exitcode(status) == 0:
            return [(str(k), str(m)) for k, m in json.loads(b"".join(chunks))]
    except (ValueError, TypeError):
        pass
    return [("", f"the config check process ended without an answer (wait status {status})")]


def _checked(path: str, text: bytes) -> Config:
    cfg: Config | None = None
    problems: list[tuple[str, str]] = []
    try:
        loaded = config_mod.load(path, text=text)
        sources = [(src.plugin, src.name, dict(src.options)) for src in loaded.discovery]
        fleet = [(src.plugin, src.name, dict(src.options)) for src in loaded.config_sources]
        ident, settings = loaded.identity, _settings(loaded.identity, loaded.instance,
                                                     loaded.state_dir)
        listener_tls = [(i, lst.tls) for i, lst in enumerate(loaded.listeners) if lst.tls]
        cfg = loaded
    except ConfigError as e:
        problems = list(e.problems)
        data = _raw(text)
        sources = _raw_sources(data)
        fleet = _raw_sources(data, "config_source", ("name", "plugin"))
        ident, settings = _raw_identity(data)
        listener_tls = _raw_listener_tls(data)
    for i, (plugin, name, options) in enumerate(sources):
        try:
            cls, _info = load_plugin(plugin)
            cls(name, options)
        except PluginError as e:
            problems.append((f"discovery[{i}].plugin", str(e)))
        except ConfigError as e:
            problems.extend((f"discovery[{i}].{k}" if k else f"discovery[{i}]", m)
                            for k, m in e.problems)
    for i, (plugin, name, options) in enumerate(fleet):
        try:
            cls, _info = load_config_source(plugin)
            cls(name, options)
        except PluginError as e:
            problems.append((f"config_source[{i}].plugin", str(e)))
        except ConfigError as e:
            problems.extend((f"config_source[{i}].{k}" if k else f"config_source[{i}]", m)
                            for k, m in e.problems)
    if ident is not None:
        problems.extend(_identity_problems(ident, settings))
    problems.extend(_listener_tls_problems(listener_tls))
    if problems or cfg is None:
        raise ConfigError(problems, path)
    return cfg


def _settings(ident: IdentityConfig | None, instance: str, state_dir: str) -> Settings:
    trust_domain = ident.trust_domain if ident is not None else default(IdentityConfig,
                                                                         "trust_domain")
    return Settings(trust_domain=trust_domain, instance=instance, state_dir=state_dir)


def _identity_problems(ident: IdentityConfig, settings: Settings) -> list[tuple[str, str]]:
    """The provider of ``[identity]`` imported and constructed with its options, as the
    control process will: its own problems under ``identity.``."""
    try:
        cls, _info = load_provider(ident.provider)
        cls(ident.options, settings)
    except PluginError as e:
        return [("identity.provider", str(e))]
    except ConfigError as e:
        return [(f"identity.{k}" if k else "identity", m) for k, m in e.problems]
    return []


def _listener_tls_problems(tables: list[tuple[int, ListenerTlsConfig]]) -> list[tuple[str, str]]:
    from meshd.tls import TlsSetupError, server_context  # ssl: only in this child (or check)
    problems = []
    for i, tls in tables:
        try:
            server_context(tls)
        except TlsSetupError as e:
            problems.append((f"listener[{i}].tls.{e.key}", str(e)))
    return problems


def _raw(text: bytes) -> dict[str, Any]:
    """The document of a config that failed to load, as load saw it (or {} when it is not
    TOML), so plugins and TLS files can still report their own problems."""
    try:
        data = tomllib.loads(text.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}
    return expand_env(data, [])  # as load does (its problems are reported already)


def _raw_identity(data: dict[str, Any]) -> tuple[IdentityConfig | None, Settings]:
    """``[identity]`` of a config that failed to load, when its provider is named."""
    table = data.get("identity")
    instance = data.get("instance")
    state_dir = data.get("state_dir")
    settings = _settings(None, instance if isinstance(instance, str) else default(Config, "instance"),
                         state_dir if isinstance(state_dir, str) else default(Config, "state_dir"))
    if not isinstance(table, dict) or not isinstance(table.get("provider"), str) \
            or not table["provider"]:
        return None, settings
    td = table.get("trust_domain")
    if isinstance(td, str) and spiffe.trust_domain_problem(td) is None:
        settings = Settings(trust_domain=td, instance=settings.instance,
                            state_dir=settings.state_dir)
    options = {k: v for k, v in table.items() if k not in ("provider", "trust_domain")}
    return IdentityConfig(provider=table["provider"], trust_domain=settings.trust_domain,
                          options=options), settings


def _raw_listener_tls(data: dict[str, Any]) -> list[tuple[int, ListenerTlsConfig]]:
    """Each well-formed ``[listener.tls]`` of a config that failed to load."""
    listeners = data.get("listener")
    if not isinstance(listeners, list):
        return []
    out = []
    for i, table in enumerate(listeners):
        tls = table.get("tls") if isinstance(table, dict) else None
        if isinstance(tls, dict) and all(isinstance(tls.get(k), str) and tls.get(k)
                                         for k in ("cert_file", "key_file")):
            out.append((i, ListenerTlsConfig(cert_file=tls["cert_file"], key_file=tls["key_file"])))
    return out


def _raw_sources(data: dict[str, Any], section: str = "discovery",
                 own: tuple[str, ...] = ("name", "plugin", "max_watches"),
                 ) -> list[tuple[str, str, dict[str, Any]]]:
    """(plugin, name, options) of each well-formed [[discovery]] (or ``section``) table
    of a config that failed to load, so the plugins can still report their own problems."""
    tables = data.get(section)
    if not isinstance(tables, list):
        return []
    sources = []
    for table in tables:
        if isinstance(table, dict) and isinstance(table.get("plugin"), str):
            options = {k: v for k, v in table.items() if k not in own}
            sources.append((table["plugin"], str(table.get("name", "")), options))
    return sources
