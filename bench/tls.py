"""`python -m bench.tls`: what pyOpenSSL would change in meshd's TLS, measured.

Two figures, each in fresh processes so one does not warm the other:
- handshake CPU: ``--pairs`` in-memory mutual TLS 1.3 handshakes (ECDSA P-256 leaf from
  ``meshd.identity.ca``, client certificate required and verified), process CPU per
  client+server pair, with the standard library's ssl and with pyOpenSSL (when it is
  installed: ``pip install pyOpenSSL``; meshd does not depend on it);
- import cost: wall time and resident-memory growth of ``import ssl`` against
  ``import OpenSSL.SSL``.
The OpenSSL each binding links is printed: the handshake figure follows the OpenSSL
build more than the binding.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

CHILD = r'''
import json, os, resource, sys, time
which, pairs = sys.argv[1], int(sys.argv[2])
if which.startswith("import-"):
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if which == "import-ssl":
        import ssl as _mod
    else:
        import OpenSSL.SSL as _mod  # noqa: F401
    print(json.dumps({"ms": (time.perf_counter() - t) * 1000,
                      "kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - r}))
    sys.exit(0)
import ssl
from meshd.identity import ca
root = ca.new_ca("bench.local")
leaf = ca.issue(root, "spiffe://bench.local/service/a")
pem = os.path.join(sys.argv[3], "leaf.pem")
with open(pem, "wb") as f:
    f.write(leaf.cert_pem + leaf.key_pem)
if which == "stdlib":
    def context(side):
        c = ssl.SSLContext(side)
        c.minimum_version = ssl.TLSVersion.TLSv1_3
        c.load_cert_chain(pem)
        c.load_verify_locations(cadata=root.cert_pem.decode())
        c.check_hostname = False
        c.verify_mode = ssl.CERT_REQUIRED
        return c
    s, c = context(ssl.PROTOCOL_TLS_SERVER), context(ssl.PROTOCOL_TLS_CLIENT)
    t = time.process_time()
    for _ in range(pairs):
        si, so, ci, co = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
        srv, cli = s.wrap_bio(si, so, server_side=True), c.wrap_bio(ci, co)
        for _ in range(10):
            for end in (cli, srv):
                try:
                    end.do_handshake()
                except ssl.SSLWantReadError:
                    pass
            si.write(co.read())
            ci.write(so.read())
        assert srv.getpeercert(), "no client certificate"
    spent = time.process_time() - t
    library = ssl.OPENSSL_VERSION
else:
    from OpenSSL import SSL, crypto
    def context():
        x = SSL.Context(SSL.TLS_METHOD)
        x.set_min_proto_version(SSL.TLS1_3_VERSION)
        x.use_certificate_chain_file(pem)
        x.use_privatekey_file(pem)
        x.get_cert_store().add_cert(crypto.load_certificate(crypto.FILETYPE_PEM, root.cert_pem))
        x.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *a: a[-1])
        return x
    s, c = context(), context()
    t = time.process_time()
    for _ in range(pairs):
        srv, cli = SSL.Connection(s, None), SSL.Connection(c, None)
        srv.set_accept_state()
        cli.set_connect_state()
        for _ in range(10):
            for a, b in ((cli, srv), (srv, cli)):
                try:
                    a.do_handshake()
                except SSL.WantReadError:
                    pass
                try:
                    b.bio_write(a.bio_read(65536))
                except SSL.WantReadError:
                    pass
        assert srv.get_peer_certificate() is not None, "no client certificate"
    spent = time.process_time() - t
    library = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
print(json.dumps({"ms_per_pair": spent / pairs * 1000, "openssl": library}))
'''


def run(which: str, pairs: int, tmp: str) -> dict[str, Any] | None:
    out = subprocess.run([sys.executable, "-c", CHILD, which, str(pairs), tmp],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        if "No module named 'OpenSSL'" in out.stderr:
            return None
        raise RuntimeError(f"{which}: {out.stderr.strip()[-2000:]}")
    return dict(json.loads(out.stdout))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tls", description=__doc__)
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o700)
        for which in ("stdlib", "pyopenssl"):
            for i in range(args.rounds):
                got = run(which, args.pairs, tmp)
                if got is None:
                    print(f"{which}: pyOpenSSL is not installed (pip install pyOpenSSL)")
                    break
                print(f"{which} round {i + 1}: {got['ms_per_pair']:.3f} ms CPU per handshake "
                      f"pair ({got['openssl']})")
        for which in ("import-ssl", "import-pyopenssl"):
            got = run(which, 0, tmp)
            if got is None:
                print(f"{which}: pyOpenSSL is not installed")
                continue
            print(f"{which}: {got['ms']:.1f} ms, +{int(got['kib']) / 1024:.1f} MiB maxrss")


if __name__ == "__main__":
    main()
