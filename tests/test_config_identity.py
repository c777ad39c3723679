"""[identity], a listener's mtls and tls, [[authorization]]: defaults and key-path errors."""

from __future__ import annotations

from typing import Any

import pytest

from meshd.config import parse
from meshd.errors import ConfigError
from meshd.identity import spiffe


def config(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "shm_dir": "/tmp/meshd-test",
        "listener": [{"name": "in", "listen": "127.0.0.1:0", "direction": "inbound",
                      "forward": "127.0.0.1:9"},
                     {"name": "out", "listen": "127.0.0.1:0"}]}
    data.update(extra)
    return data


def problems(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as e:
        parse(data)
    return dict(e.value.problems)


def test_mtls_is_off_without_identity_and_permissive_inbound_with_it() -> None:
    assert [lst.mtls for lst in parse(config()).listeners] == ["off", "off"]
    cfg = parse(config(identity={"provider": "files", "cert_file": "c"}))
    assert [lst.mtls for lst in cfg.listeners] == ["permissive", "off"]
    assert cfg.identity is not None and cfg.identity.trust_domain == "cluster.local"
    assert dict(cfg.identity.options) == {"cert_file": "c"}


def test_identity_and_listener_rules_name_their_keys() -> None:
    data = config(identity={"trust_domain": "Upper.Case"})
    data["listener"][0].update(mtls="sometimes", tls={"cert_file": "a"})
    data["listener"][1]["mtls"] = "strict"
    assert problems(data) == {
        "identity.provider": "required",
        "identity.trust_domain": "'Upper.Case' is not a trust domain (lowercase letters, "
                                 "digits, '.', '-', '_'; at most 255)",
        "listener[0].mtls": 'expected one of "off", "permissive", "strict", got \'sometimes\'',
        "listener[0].tls.key_file": "required",
        "listener[1].mtls": "only an inbound listener terminates mTLS from peer meshds; an "
                            "outbound one takes [listener.tls] for TLS from its clients",
    }


def test_strict_needs_identity_and_excludes_listener_tls() -> None:
    data = config()
    data["listener"][0].update(mtls="strict", tls={"cert_file": "a", "key_file": "b"})
    found = problems(data)
    assert found["listener[0].mtls"].startswith('mtls = "strict" needs an [identity] table')
    assert found["listener[0].tls"].endswith('[listener.tls] needs mtls = "off"')


def test_listener_tls_alone_is_fine_on_any_listener() -> None:
    data = config()
    data["listener"][1]["tls"] = {"cert_file": "a.crt", "key_file": "a.key"}
    cfg = parse(data)
    assert cfg.listeners[1].tls is not None and cfg.listeners[1].tls.key_file == "a.key"


def test_authorization_rules() -> None:
    data = config(authorization=[
        {"listener": "out", "allow": ["spiffe://td/ns/*/sa/web", "web"]},
        {"listener": "in", "allow": ["spiffe://td/a"], "route": "nope", "mode": "log"},
        {"listener": "in", "allow": []},
    ])
    found = problems(data)
    assert found["authorization[0].allow"] == ("[1]: 'web' is not a SPIFFE ID "
                                               "(spiffe://TRUST-DOMAIN/PATH)")
    assert found["authorization[0].listener"].startswith("listener 'out' is outbound")
    assert found["authorization[1].route"] == "no [[route]] is named 'nope'"
    assert found["authorization[1].mode"] == 'expected one of "enforce", "audit", got \'log\''
    assert found["authorization[2].allow"].startswith("expected a non-empty list")
    # without [identity] an inbound listener has no client identity to check
    assert found["authorization[1].listener"].startswith("listener 'in' has mtls = \"off\"")


def test_authorization_with_identity_parses() -> None:
    cfg = parse(config(identity={"provider": "files"}, authorization=[
        {"listener": "in", "allow": ["spiffe://cluster.local/ns/*/sa/web"], "mode": "audit"}]))
    assert cfg.authorization[0].mode == "audit" and cfg.authorization[0].route is None


@pytest.mark.parametrize("value,ok", [
    ("spiffe://cluster.local/ns/default/sa/web", True),
    ("spiffe://td/service/web", True),
    ("spiffe://TD/service/web", False),
    ("spiffe://td", False),
    ("spiffe://td/", False),
    ("spiffe://td/a//b", False),
    ("spiffe://td/a/../b", False),
    ("spiffe://td/a/b?x=1", False),
    ("spiffe://td:443/a", False),
    ("https://td/a", False),
    ("spiffe://td/" + "a" * 2040, False),
])
def test_spiffe_ids(value: str, ok: bool) -> None:
    assert (spiffe.problem(value) is None) is ok


def test_star_matches_within_one_segment_only() -> None:
    allow = spiffe.compile_patterns(["spiffe://td/ns/*/sa/web", "spiffe://td/service/api-*"])
    assert allow.fullmatch("spiffe://td/ns/prod/sa/web")
    assert allow.fullmatch("spiffe://td/service/api-v2")
    assert not allow.fullmatch("spiffe://td/ns/a/b/sa/web")
    assert not allow.fullmatch("spiffe://td/ns/prod/sa/webx")
    assert not allow.fullmatch("spiffe://td/service/api-v2/x")
    assert not spiffe.compile_patterns([]).fullmatch("spiffe://td/a")
