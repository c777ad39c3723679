"""One validation for `meshd check`, `meshd run` and a reload (HUP): the config's own
keys, every discovery source's keys as its plugin validates them, and the TLS files of
``[service.NAME.tls]``. All three go through ``load_checked``, so they accept and refuse
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
from meshd.discovery.registry import load as load_plugin
from meshd.errors import ConfigError, PluginError

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
        cfg = loaded
    except ConfigError as e:
        problems = list(e.problems)
        sources = _raw_sources(text)
    for i, (plugin, name, options) in enumerate(sources):
        try:
            cls, _info = load_plugin(plugin)
            cls(name, options)
        except PluginError as e:
            problems.append((f"discovery[{i}].plugin", str(e)))
        except ConfigError as e:
            problems.extend((f"discovery[{i}].{k}" if k else f"discovery[{i}]", m)
                            for k, m in e.problems)
    if problems or cfg is None:
        raise ConfigError(problems, path)
    return cfg


def _raw_sources(text: bytes) -> list[tuple[str, str, dict[str, Any]]]:
    """(plugin, name, options) of each well-formed [[discovery]] table of a config that
    failed to load, so the plugins can still report their own problems."""
    try:
        data = tomllib.loads(text.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return []
    data = expand_env(data, [])  # as load does (its problems are reported already)
    tables = data.get("discovery")
    if not isinstance(tables, list):
        return []
    sources = []
    for table in tables:
        if isinstance(table, dict) and isinstance(table.get("plugin"), str):
            options = {k: v for k, v in table.items() if k not in ("name", "plugin", "max_watches")}
            sources.append((table["plugin"], str(table.get("name", "")), options))
    return sources
