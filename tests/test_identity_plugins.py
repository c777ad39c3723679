"""Identity providers as plugins of another distribution: a watch() that fails is logged
naming the distribution and restarted with backoff while the last good identity stays;
a provider that fails to import is refused by `meshd check` under identity.provider."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from meshd.identity import ca
from meshd.testing.identity_files import TD, WEB, files, leaf, replace_files
from meshd.testing.plugins import make_distribution

FLAKY = '''
from pathlib import Path
from meshd.errors import ConfigError
from meshd.identity.api import Material

class Flaky:
    """Yields the material in options["dir"], then loses its agent."""
    def __init__(self, options, settings):
        if "dir" not in options:
            raise ConfigError([("dir", "required")])
        self.dir = Path(options["dir"])

    def watch(self):
        d = self.dir
        yield Material((d / "tls.crt").read_bytes(), (d / "tls.key").read_bytes(),
                       (d / "ca.crt").read_bytes())
        raise RuntimeError("lost the agent's socket")
'''


def test_a_failing_watch_is_restarted_and_named_by_its_distribution(mesh, backends, tmp_path) -> None:
    root = make_distribution(tmp_path / "plugins", "flaky-identity", {"flaky": "flakyid:Flaky"},
                             "flakyid", FLAKY, group="meshd.identity")
    authority = ca.new_ca(TD)
    web = leaf(authority)
    folder = tmp_path / "identity"
    replace_files(folder, files(web.cert_pem, web.key_pem, authority.cert_pem))
    env = dict(os.environ, PYTHONPATH=str(root))
    a = backends("a")
    m = mesh.run({"web": [a.address]}, workers=1, env=env,
                 extra=f'[identity]\nprovider = "flaky"\ndir = "{folder}"\n')
    m.wait_metric("meshd_identity_watch_failures_total", at_least=2)
    assert re.search(r"ERROR meshd\[\d+\] meshd.control: identity: provider flaky \(flaky-identity "
                     r"0\.0\.1\): watch failed: RuntimeError: lost the agent's socket; keeping "
                     + re.escape(WEB), m.log()), m.log()
    # Published once: the same material yielded again by each restarted watch is not
    # rewritten (workers do not reload it) nor logged again.
    assert m.metric("meshd_identity_published_total") == 1
    assert m.log().count(f"identity: published {WEB} (expires") == 1
    assert m.log().count(f"identity: worker {m.worker_pids()[0]} loaded") == 1


def test_a_provider_that_fails_to_import_is_refused_by_check(mesh, tmp_path) -> None:
    root = make_distribution(tmp_path / "plugins", "broken-identity", {"broken": "brokenid:P"},
                             "brokenid", "raise RuntimeError('no agent library')\n",
                             group="meshd.identity")
    path = tmp_path / "m.toml"
    path.write_text(mesh.config({"web": ["127.0.0.1:1"]})[0]
                    + '\n[identity]\nprovider = "broken"\n')
    out = subprocess.run([sys.executable, "-m", "meshd", "check", "-c", str(path)],
                         capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(root)))
    assert out.returncode == 2
    assert (f"{path}: identity.provider: identity plugin 'broken' from distribution "
            "broken-identity 0.0.1 failed to import: RuntimeError: no agent library") in out.stderr
