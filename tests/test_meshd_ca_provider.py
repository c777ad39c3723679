"""The meshd-ca identity provider in-process: its options and their key-path errors, the
identity it picks (given, Kubernetes service account, service), and watch(): a leaf
issued and renewed at renew_at of its life (an injected clock: no long sleeps; one short
real renewal), a CA rotation in the directory reaching the roots and the next leaf, a
broken CA directory leaving the CA in memory in use."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from meshd.errors import ConfigError
from meshd.identity import ca as ca_mod
from meshd.identity import ca_dir, material
from meshd.identity.api import Material, Settings
from meshd.identity.meshd_ca import CaExpired, MeshdCaProvider

TD = "lab.example"
WEB = f"spiffe://{TD}/service/web"


class Clock:
    """now() and sleep() for the provider: sleeping moves time, at once."""

    def __init__(self) -> None:
        self.t = datetime.datetime.now(datetime.UTC)
        self.slept: list[float] = []

    def now(self) -> datetime.datetime:
        return self.t

    def sleep(self, seconds: float) -> None:
        assert seconds > 0 and len(self.slept) < 10_000
        self.slept.append(seconds)
        self.t += datetime.timedelta(seconds=seconds)


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    path = tmp_path / "ca"
    ca_dir.init(str(path), TD)
    return path


def settings(tmp_path: Path, td: str = TD) -> Settings:
    return Settings(trust_domain=td, instance="t", state_dir=str(tmp_path))


def provider(ca: Path, clock: Clock | None = None, env: dict[str, str] | None = None,
             namespace_file: str = "/nonexistent", **options: Any) -> MeshdCaProvider:
    opts = {"dir": str(ca), **options}
    kwargs: dict[str, Any] = {"environ": env or {}, "namespace_file": namespace_file}
    if clock is not None:
        kwargs.update(now=clock.now, sleep=clock.sleep)
    return MeshdCaProvider(opts, settings(ca.parent), **kwargs)


def problems(ca: Path, **kwargs: Any) -> dict[str, str]:
    with pytest.raises(ConfigError) as e:
        provider(ca, **kwargs)
    return dict(e.value.problems)


def leaf_of(m: Material) -> x509.Certificate:
    return x509.load_pem_x509_certificates(m.chain_pem)[0]


def check(m: Material, identity: str = WEB) -> x509.Certificate:
    """What meshd checks before publishing (material.check: the key is the leaf's, one
    SPIFFE URI SAN in the trust domain, valid now, a path to a root), and the same by hand."""
    assert material.check(m, TD, now=clock_now(m)).spiffe_id == identity
    leaf = leaf_of(m)
    key = serialization.load_pem_private_key(m.key_pem, password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert (key.public_key().public_bytes(serialization.Encoding.DER, spki)
            == leaf.public_key().public_bytes(serialization.Encoding.DER, spki))
    assert ca_dir.uri_sans(leaf) == [identity]
    _signer(leaf, x509.load_pem_x509_certificates(m.roots_pem))
    assert m.trust_domain == TD
    return leaf


def clock_now(m: Material) -> datetime.datetime:
    # a time inside the leaf's life (tests move an injected clock far ahead of real time)
    return leaf_of(m).not_valid_before_utc + datetime.timedelta(minutes=2)


def _signer(leaf: x509.Certificate, roots: list[x509.Certificate]) -> x509.Certificate:
    for r in roots:
        try:
            leaf.verify_directly_issued_by(r)
            return r
        except (InvalidSignature, ValueError, TypeError):   # another root's
            continue
    raise AssertionError("no root signed the leaf")


# -- options ---------------------------------------------------------------------------------

def test_options_and_their_key_path_errors(ca: Path, tmp_path: Path) -> None:
    p = provider(ca, service="web")
    assert (p.identity, p.ttl, p.renew_at) == (WEB, 86400.0, pytest.approx(2 / 3))
    assert provider(ca, identity=f"spiffe://{TD}/x/y", ttl="1m", renew_at=0.5).ttl == 60.0
    assert problems(ca, ttl="30s", renew_at=1.5, bogus=1, service="web") == {
        "ttl": "must be at least 60s, got '30s'",
        "renew_at": "must be between 0.01 and 0.99, got 1.5",
        "bogus": "unknown key"}
    assert problems(ca, identity="spiffe://other.example/service/web") == {
        "identity": f"spiffe://other.example/service/web is not in [identity] trust_domain "
                    f"'{TD}'"}
    assert problems(ca, identity=WEB, service="web") == {
        "service": "give identity or service, not both"}
    assert "has a character outside" in problems(ca, service="w b")["service"]
    found = problems(ca)
    assert found == {"service": "required outside Kubernetes (or give identity): the "
                                f"identity is spiffe://{TD}/service/NAME"}
    with pytest.raises(ConfigError) as e:
        MeshdCaProvider({"service": "web"}, settings(tmp_path), environ={})
    assert e.value.problems == [("dir", "required")]


def test_dir_problems_name_the_dir_key(ca: Path, tmp_path: Path) -> None:
    assert problems(tmp_path / "none", service="web") == {
        "dir": f"{tmp_path / 'none'} does not exist (make a CA with meshd ca init)"}
    with pytest.raises(ConfigError) as e:
        MeshdCaProvider({"dir": str(ca), "service": "web"}, settings(tmp_path, "other.example"),
                        environ={})
    assert e.value.problems == [("dir", f"the CA in {ca} is for trust domain '{TD}', "
                                        f"[identity] trust_domain is 'other.example'")]
    (ca / "ca.key").chmod(0o644)
    assert problems(ca, service="web") == {
        "dir": f"{ca / 'ca.key'} is mode 0644; a private key must be 0600 "
               f"(chmod 600 {ca / 'ca.key'})"}
    (ca / "ca.key").chmod(0o600)
    other = ca_mod.new_ca(TD)
    ca_dir.write_new(str(ca / "ca.key"), other.key_pem, 0o600, force=True)
    assert problems(ca, service="web")["dir"].startswith(
        f"no certificate in {ca / 'ca.crt'} belongs to the key in {ca / 'ca.key'}")


def test_kubernetes_identity_from_the_service_account(ca: Path, tmp_path: Path) -> None:
    ns = tmp_path / "namespace"
    ns.write_text("prod\n")
    k8s = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "MESHD_SERVICE_ACCOUNT": "web"}
    assert provider(ca, env=k8s, namespace_file=str(ns)).identity == \
        f"spiffe://{TD}/ns/prod/sa/web"
    assert provider(ca, env=k8s, namespace_file=str(ns), service_account="api").identity == \
        f"spiffe://{TD}/ns/prod/sa/api"
    assert problems(ca, env={"KUBERNETES_SERVICE_HOST": "10.96.0.1"},
                    namespace_file=str(ns)) == {
        "service_account": "required in Kubernetes (or the env MESHD_SERVICE_ACCOUNT or "
                           "POD_SERVICE_ACCOUNT): the identity is "
                           f"spiffe://{TD}/ns/prod/sa/SERVICE-ACCOUNT"}
    # what `meshd inject` puts in the sidecar's environment is enough
    injected = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "POD_SERVICE_ACCOUNT": "pod-sa"}
    assert provider(ca, env=injected, namespace_file=str(ns)).identity == \
        f"spiffe://{TD}/ns/prod/sa/pod-sa"
    # the host variable without a readable namespace file is not Kubernetes
    assert provider(ca, env=k8s, namespace_file=str(tmp_path / "no"), service="web"
                    ).identity == WEB


# -- watch -----------------------------------------------------------------------------------

def test_watch_issues_then_renews_at_the_fraction_of_the_lifetime(ca: Path) -> None:
    clock = Clock()
    p = provider(ca, clock, service="web", ttl="24h")
    p.poll_interval = 3600.0
    gen = p.watch()
    first = next(gen)
    leaf = check(first)
    start = clock.t
    assert leaf.not_valid_after_utc - start > datetime.timedelta(hours=23, minutes=59)
    assert first.roots_pem == (ca / "ca.crt").read_bytes()
    assert "key=<hidden>" in repr(first)
    second = next(gen)
    waited = (clock.t - start).total_seconds()
    assert waited == pytest.approx(86400 * 2 / 3, abs=2)   # not before, not much after
    assert max(clock.slept) <= 3600.0
    leaf2 = check(second)
    assert leaf2.serial_number != leaf.serial_number and second.key_pem != first.key_pem
    assert leaf2.not_valid_before_utc > leaf.not_valid_before_utc


def test_watch_follows_a_ca_rotation_in_the_directory(ca: Path, caplog: Any) -> None:
    clock = Clock()
    p = provider(ca, clock, service="web")
    gen = p.watch()
    old_root = (ca / "ca.crt").read_bytes()
    first = check(next(gen))
    new = ca_mod.new_ca(TD)
    # the rotation: the new root beside the old one, its key in ca.key
    ca_dir.write_new(str(ca / "ca.crt"), old_root + new.cert_pem, 0o644, force=True)
    ca_dir.write_new(str(ca / "ca.key"), new.key_pem, 0o600, force=True)
    with caplog.at_level(logging.INFO, logger="meshd.identity"):
        rotated = next(gen)
    assert clock.slept == [p.poll_interval]           # at the first look, not at renewal
    assert rotated.roots_pem == old_root + new.cert_pem
    leaf = check(rotated)
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(new.cert_pem))
    assert leaf.issuer == first.issuer                # same name, new key: signature proves it
    assert "the CA in" in caplog.text and "changed (2 roots)" in caplog.text
    assert new.key_pem.decode().splitlines()[1] not in caplog.text


def test_watch_keeps_the_ca_in_memory_when_the_directory_breaks(ca: Path, caplog: Any) -> None:
    clock = Clock()
    p = provider(ca, clock, service="web", ttl="1h")
    p.poll_interval = 60.0
    gen = p.watch()
    first = next(gen)
    stray = ca_mod.new_ca(TD)
    ca_dir.write_new(str(ca / "ca.key"), stray.key_pem, 0o600, force=True)  # matches no root
    with caplog.at_level(logging.WARNING, logger="meshd.identity"):
        renewed = next(gen)
    assert "the CA directory changed and does not load; the CA in memory stays" in caplog.text
    assert (clock.t - first_time(first)).total_seconds() == pytest.approx(2400 + 60, abs=2)
    check(renewed)
    assert renewed.roots_pem == first.roots_pem
    assert stray.key_pem.decode().splitlines()[1] not in caplog.text


def first_time(m: Material) -> datetime.datetime:
    return leaf_of(m).not_valid_before_utc   # issued a minute (SKEW) before "now"


def test_watch_renews_for_real_with_a_short_ttl(ca: Path) -> None:
    p = provider(ca, service="web", ttl="1m", renew_at=0.02)   # renew after 1.2 s
    gen: Iterator[Material] = p.watch()
    t0 = datetime.datetime.now(datetime.UTC)
    first = check(next(gen))
    second = check(next(gen))
    took = (datetime.datetime.now(datetime.UTC) - t0).total_seconds()
    assert 1.0 <= took < 30
    assert second.serial_number != first.serial_number
    assert first.not_valid_after_utc - first.not_valid_before_utc == \
        datetime.timedelta(minutes=2)   # from a minute ago (clock skew) for ttl


def test_watch_refuses_an_expired_ca(tmp_path: Path) -> None:
    path = tmp_path / "ca"
    path.mkdir(mode=0o700)
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    old = ca_mod.new_ca(TD, ttl=86400, now=past)
    ca_dir.write_new(str(path / "ca.key"), old.key_pem, 0o600)
    ca_dir.write_new(str(path / "ca.crt"), old.cert_pem, 0o644)
    p = provider(path, service="web")
    with pytest.raises(CaExpired, match="not now: no leaf can be issued"):
        next(p.watch())
