"""A CA directory on disk, as ``meshd ca init`` makes it and ``meshd ca issue`` and the
``meshd-ca`` provider read it.

Layout: ``D/ca.crt`` (the trust anchors, PEM; the first is the one ``init`` made) and
``D/ca.key`` (the signing key, PKCS#8 PEM, unencrypted: this is a lab CA), ``D`` mode
0700, ``ca.key`` 0600. Every certificate in ``ca.crt`` is a root peers trust; the one
whose public key is ``ca.key``'s signs. So a CA rotation is: a new root (``meshd ca init``
elsewhere) appended to ``ca.crt``, its key written over ``ca.key``; peers that read the
same ``ca.crt`` trust old and new leaves alike until the old root is dropped.

Files are created exclusively and whole: written at a temporary name in the same
directory, then linked to their name (``link`` fails if the name exists, so nothing is
ever overwritten by accident and a reader never sees half a file). ``--force`` replaces
by ``rename`` instead. The key is read only when it is a regular file owned by this uid
that no one else may read or write, opened without following a symbolic link; ``ca.crt``
must be owned by this uid and writable by no one else (a planted root is a planted
identity for every peer).
"""

from __future__ import annotations

import datetime
import os
import stat
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshd import private_files
from meshd.identity import ca as ca_mod
from meshd.identity import spiffe

CERT_NAME = "ca.crt"
KEY_NAME = "ca.key"
MAX_FILE_BYTES = 1 << 20      # a PEM file meshd reads: far more than any sane chain or key
MAX_CERTS = 32                # roots in one ca.crt (a rotation needs two)


class CaDirError(Exception):
    """A CA directory (or a file meant for one) that cannot be used; the message says why
    and what to do, and never holds key material."""


@dataclass(frozen=True, slots=True)
class CaDir:
    """A loaded CA directory. ``signing`` holds the signing certificate and its key (the
    key is hidden from ``repr``); ``roots_pem`` every certificate of ``ca.crt``."""

    path: str
    trust_domain: str
    signing: ca_mod.Issued
    roots_pem: bytes
    not_before: datetime.datetime
    not_after: datetime.datetime

    @property
    def cert_path(self) -> str:
        return os.path.join(self.path, CERT_NAME)

    @property
    def key_path(self) -> str:
        return os.path.join(self.path, KEY_NAME)


def stamp(path: str) -> tuple[tuple[int, int, int], ...]:
    """What changes when ``ca.crt`` or ``ca.key`` is replaced or rewritten (mtime, inode,
    size of each; zeros for a file that is missing): cheap to poll."""
    out = []
    for name in (CERT_NAME, KEY_NAME):
        try:
            st = os.stat(os.path.join(path, name))
            out.append((st.st_mtime_ns, st.st_ino, st.st_size))
        except OSError:
            out.append((0, 0, 0))
    return tuple(out)


def init(path: str, trust_domain: str, ttl: float = ca_mod.DEFAULT_CA_TTL) -> CaDir:
    """Make a new CA in ``path`` (created 0700 if absent; an existing one must be a
    directory of this uid that no one else may use, without ``ca.crt`` or ``ca.key``)."""
    problem = spiffe.trust_domain_problem(trust_domain)
    if problem:
        raise CaDirError(problem)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise CaDirError(f"cannot create {path}: {e.strerror}") from None
    _check_dir(path)
    for name in (CERT_NAME, KEY_NAME):
        if os.path.lexists(os.path.join(path, name)):
            raise CaDirError(f"{path} already holds a CA ({name} exists); meshd ca init never "
                             f"overwrites one: give another --dir, or remove that one first")
    made = ca_mod.new_ca(trust_domain, ttl=ttl)
    key_path = os.path.join(path, KEY_NAME)
    write_new(key_path, made.key_pem, 0o600)
    try:
        write_new(os.path.join(path, CERT_NAME), made.cert_pem, 0o644)
    except BaseException:
        os.unlink(key_path)
        raise
    return load(path)


def load(path: str) -> CaDir:
    """Read and check the CA in ``path`` (see the module docstring for the rules)."""
    _check_dir(path)
    cert_path = os.path.join(path, CERT_NAME)
    key_path = os.path.join(path, KEY_NAME)
    try:
        cert_data = private_files.read_trusted(cert_path)
    except FileNotFoundError:
        raise CaDirError(f"{cert_path} does not exist: make a CA with "
                         f"`meshd ca init --dir {path} --trust-domain TD`") from None
    except OSError as e:
        raise CaDirError(f"cannot read {cert_path}: {e.strerror or e}") from None
    key_data = read_key(key_path)
    if len(cert_data) > MAX_FILE_BYTES:
        raise CaDirError(f"{cert_path} is larger than {MAX_FILE_BYTES} bytes")
    certs = parse_certificates(cert_data, cert_path)
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError):
        raise CaDirError(f"{key_path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CaDirError(f"{key_path} is not an ECDSA key (meshd ca signs with ECDSA P-256)")
    try:
        public = _spki(key.public_key())
        signing = next((c for c in certs if _spki(c.public_key()) == public), None)
        if signing is None:
            raise CaDirError(f"no certificate in {cert_path} belongs to the key in {key_path} "
                             f"(mid-rotation? the new root goes into {CERT_NAME} with its key "
                             f"in {KEY_NAME})")
        if not is_ca(signing):
            raise CaDirError(f"the certificate of {key_path} in {cert_path} is not a CA "
                             f"certificate (basicConstraints CA:TRUE)")
        domain = ca_trust_domain(signing)
        if not domain:
            raise CaDirError(f"the signing certificate in {cert_path} has no "
                             f"spiffe://TRUST-DOMAIN URI SAN (meshd ca init gives it one)")
    except (ValueError, UnsupportedAlgorithm) as e:   # a damaged field (parsed lazily)
        raise CaDirError(f"{cert_path}: a certificate does not parse: {str(e)[:80]}") from None
    roots = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    signing_pem = signing.public_bytes(serialization.Encoding.PEM)
    return CaDir(path=path, trust_domain=domain,
                 signing=ca_mod.Issued(signing_pem, key_data), roots_pem=roots,
                 not_before=signing.not_valid_before_utc,
                 not_after=signing.not_valid_after_utc)


def read_key(path: str) -> bytes:
    """A private key file: a regular file owned by this uid, mode 0600 or stricter, not
    a symbolic link. Checked on the open file (no swap between check and use)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CaDirError(f"{path} does not exist") from None
    except OSError as e:
        raise CaDirError(f"cannot open {path}: {e.strerror} (a symbolic link is not "
                         f"followed)") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISREG(st.st_mode):
            raise CaDirError(f"{path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise CaDirError(f"{path} is owned by uid {st.st_uid}, not this process's uid "
                             f"{os.geteuid()}; a CA key is read only by its owner")
        if mode & 0o077:
            raise CaDirError(f"{path} is mode {mode:04o}; a private key must be 0600 "
                             f"(chmod 600 {path})")
        os.set_blocking(fd, True)
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise CaDirError(f"{path} is larger than {MAX_FILE_BYTES} bytes")
    return data


def parse_certificates(data: bytes, where: str) -> list[x509.Certificate]:
    """Every PEM certificate in ``data`` (at least one, at most ``MAX_CERTS``)."""
    if data.count(b"-----BEGIN CERTIFICATE-----") > MAX_CERTS:
        raise CaDirError(f"{where} holds more than {MAX_CERTS} certificates")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except (ValueError, x509.InvalidVersion):
        raise CaDirError(f"{where} holds no readable PEM certificate") from None
    return certs


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]


def ca_trust_domain(cert: x509.Certificate) -> str:
    """The trust domain a CA certificate names in its ``spiffe://TD`` URI SAN, or ""."""
    for uri in uri_sans(cert):
        if uri.startswith(spiffe.SCHEME):
            domain = uri[len(spiffe.SCHEME):].rstrip("/")
            if domain and spiffe.trust_domain_problem(domain) is None:
                return domain
    return ""


def write_new(path: str, data: bytes, mode: int, force: bool = False) -> None:
    """Write ``path`` whole with ``mode``: at a temporary name beside it, then linked to
    its name (refused when the name exists, ``FileExistsError``) or, with ``force``,
    renamed over it."""
    fd, tmp = private_files.create_temp(path)   # 0600 from the start
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if mode != 0o600:
                os.fchmod(f.fileno(), mode)
        if force:
            os.rename(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _check_dir(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CaDirError(f"{path} does not exist (make a CA with meshd ca init)") from None
    except OSError as e:
        raise CaDirError(f"{path}: {e.strerror}") from None
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode):
        raise CaDirError(f"{path} is not a directory")
    if st.st_uid != os.geteuid():
        raise CaDirError(f"{path} is owned by uid {st.st_uid}, not this process's uid "
                         f"{os.geteuid()}")
    if mode & 0o077:
        raise CaDirError(f"{path} is mode {mode:04o}; a CA directory is 0700 "
                         f"(chmod 700 {path}, or give a new path)")


def _spki(public: object) -> bytes:
    return public.public_bytes(serialization.Encoding.DER,   # type: ignore[attr-defined]
                               serialization.PublicFormat.SubjectPublicKeyInfo)
