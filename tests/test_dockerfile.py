"""The Dockerfile, read structurally (base images cannot be pulled here, so it is not
built): a slim Python base, meshd and every in-tree discovery plugin installed from the
source tree into a venv, iptables for the init container, uid 2102, entrypoint meshd."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)  # continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_base_user_and_entrypoint() -> None:
    ins = instructions()
    assert ins[0][0] == "FROM" and re.fullmatch(r"python:3\.1[1-9]-slim\S*", ins[0][1])
    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1].split(":")[0] == "2102"
    # the last USER comes after every RUN: nothing runs as root at run time
    last_run = max(i for i, (op, _) in enumerate(ins) if op == "RUN")
    assert max(i for i, (op, _) in enumerate(ins) if op == "USER") > last_run
    entry = [rest for op, rest in ins if op == "ENTRYPOINT"]
    assert [json.loads(e) for e in entry] == [["meshd"]]


def test_installs_meshd_and_the_in_tree_plugins_with_iptables() -> None:
    runs = " ".join(rest for op, rest in instructions() if op == "RUN")
    assert re.search(r"apt-get install [^&]*\biptables\b", runs)
    installed = re.search(r"pip install ([^&]*)", runs)
    assert installed is not None
    paths = installed.group(1).split()
    assert "/src" in paths
    plugins = sorted(p.name for p in (ROOT / "plugins").iterdir()
                     if (p / "setup.cfg").exists() and p.name != "example")
    assert sorted(p.removeprefix("/src/plugins/") for p in paths
                  if p.startswith("/src/plugins/")) == plugins
    # the version the image is tagged with is what `meshd inject` refers to
    from meshd import __version__
    assert f"meshd:{__version__}" in (ROOT / "Dockerfile").read_text()


def test_dockerignore_keeps_the_venv_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
