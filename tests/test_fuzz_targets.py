"""Every fuzz target's one-input function over its seed corpus, without atheris (which
only `make fuzz` installs): the targets keep importing and running as meshd changes, and
each seed still passes its invariants."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fuzz import TARGETS  # noqa: E402

SEEDS = [(name, path) for name in TARGETS
         for path in sorted((ROOT / "fuzz" / "corpus" / name).iterdir())]


def test_every_target_has_seeds():
    assert {name for name, _ in SEEDS} == set(TARGETS)
    for name in TARGETS:
        module = importlib.import_module(f"fuzz.fuzz_{name}")
        assert callable(module.one_input) and module.MAX_LEN > 0
        assert all(len(p.read_bytes()) <= module.MAX_LEN for n, p in SEEDS if n == name)


@pytest.mark.parametrize("name,path", SEEDS, ids=[f"{n}-{p.name}" for n, p in SEEDS])
def test_seed(name, path):
    importlib.import_module(f"fuzz.fuzz_{name}").one_input(path.read_bytes())


def test_the_seeds_are_what_seeds_py_writes(tmp_path, monkeypatch):
    """fuzz/corpus is generated: a seed edited by hand would be lost on the next run."""
    import fuzz.seeds
    monkeypatch.setattr(fuzz.seeds, "CORPUS", tmp_path)
    fuzz.seeds.main()
    for name in TARGETS:
        made = {p.name: p.read_bytes() for p in (tmp_path / name).iterdir()}
        kept = {p.name: p.read_bytes() for p in (ROOT / "fuzz" / "corpus" / name).iterdir()}
        if name == "detect":  # the ClientHello is new each time (random, key share)
            made = {k: v for k, v in made.items() if not v.startswith(b"\x16")}
            kept = {k: v for k, v in kept.items() if not v.startswith(b"\x16")}
        assert made == kept, f"{name}: fuzz/corpus differs from what `python -m fuzz.seeds` writes"
