"""Each config default is written once, on its dataclass: a file that sets nothing gets
exactly the dataclasses' defaults (parse reads them from the fields)."""

from __future__ import annotations

import dataclasses

import pytest

from meshd import config as config_mod
from meshd.balance.ewma import DECAY, DEFAULT_RTT
from meshd.config import (
    DEFAULT_SERVICE,
    AdminConfig,
    BalancerConfig,
    Config,
    LimitsConfig,
    ListenerConfig,
    RouteConfig,
    ServiceConfig,
    TlsConfig,
)
from meshd.config_table import default as _default
from meshd.proto.detect import DEFAULT_OPAQUE_PORTS

MINIMAL = {
    "shm_dir": "/tmp/meshd-test",
    "listener": [{"name": "out", "listen": "127.0.0.1:0"},
                 {"name": "in", "listen": "127.0.0.1:0", "direction": "inbound",
                  "forward": "127.0.0.1:8080"}],
    "service": {"web": {}, "secure": {"tls": {"verify": True}}},
    "route": [{"host": "web"}],
}


def test_a_file_that_sets_nothing_gets_the_dataclass_defaults():
    cfg = config_mod.parse(MINIMAL, check_files=False)
    for f in dataclasses.fields(Config):
        if f.default is not dataclasses.MISSING and f.name != "routes":  # one given
            assert getattr(cfg, f.name) == f.default, f.name
    assert cfg.admin == AdminConfig() and cfg.limits == LimitsConfig()
    assert cfg.balancer == BalancerConfig() == BalancerConfig(DECAY, DEFAULT_RTT)
    out, inbound = cfg.listeners
    assert out == ListenerConfig(name="out", listen=out.listen, direction="outbound",
                                 protocol="auto")
    assert inbound.forwarded == "replace"  # the one default that depends on another key
    assert out.opaque_ports == DEFAULT_OPAQUE_PORTS
    assert cfg.services["web"] == dataclasses.replace(DEFAULT_SERVICE, name="web")
    assert cfg.services["secure"].tls == TlsConfig()
    assert cfg.routes == (RouteConfig(name="route0", host="web"),)


def test_default_names_a_field_without_one():
    assert _default(ServiceConfig, "timeout") == 10.0
    with pytest.raises(KeyError, match="ServiceConfig.name has no default"):
        _default(ServiceConfig, "name")


def test_config_is_built_with_keywords():
    with pytest.raises(TypeError):
        Config("", 1, 30.0)  # type: ignore[misc]
