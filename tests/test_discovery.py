"""Discovery: the update algebra (api.apply), the plugin registry, and the static plugin."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from meshd_static import StaticBackend

from meshd.discovery.api import Add, Endpoint, NoSuchService, Remove, Reset, apply
from meshd.discovery.registry import GROUP, available, load
from meshd.errors import ConfigError, PluginError

A = Endpoint("10.0.0.1", 80)
B = Endpoint("10.0.0.2", 80)
C = Endpoint("10.0.0.3", 80)


# -- api.apply -----------------------------------------------------------------------------

def test_reset_replaces_everything_and_drops_duplicates() -> None:
    assert apply((A, B), Reset((C,))) == (C,)
    assert apply((A,), Reset((B, C, B))) == (B, C)
    assert apply((A, B), Reset(())) == ()


def test_add_appends_new_addresses() -> None:
    assert apply((A,), Add((B, C))) == (A, B, C)
    assert apply((), Add((A,))) == (A,)


def test_add_of_a_known_address_replaces_it_in_place() -> None:
    heavier = Endpoint("10.0.0.1", 80, weight=5, zone="b", meshed=True)
    assert apply((A, B), Add((heavier, C))) == (heavier, B, C)
    other_port = Endpoint("10.0.0.1", 81)
    assert apply((A, B), Add((other_port,))) == (A, B, other_port)


def test_remove_by_address() -> None:
    same_address = Endpoint("10.0.0.2", 80, weight=9)  # other fields do not matter
    assert apply((A, B, C), Remove((same_address,))) == (A, C)
    assert apply((A,), Remove((C,))) == (A,)
    assert apply((A, B), Remove((A, B))) == ()


def test_no_such_service_empties_the_set() -> None:
    assert apply((A, B), NoSuchService()) == ()


def test_endpoint_str() -> None:
    assert str(A) == "10.0.0.1:80"
    assert str(Endpoint("::1", 443)) == "[::1]:443"


# -- registry ------------------------------------------------------------------------------

def fake_distribution(root: Path, name: str, version: str, entry_points: dict[str, str]) -> None:
    """An installed distribution as importlib.metadata sees one: a *.dist-info directory."""
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    info.joinpath("METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "".join(f"{ep} = {value}\n" for ep, value in entry_points.items())
    info.joinpath("entry_points.txt").write_text(f"[{GROUP}]\n{lines}")


def test_static_is_found_without_importing_it() -> None:
    script = textwrap.dedent("""\
        import sys
        from meshd.discovery.registry import available, load
        plugins, refused = available()
        info = plugins["static"]
        assert (info.distribution, info.value) == ("meshd-static", "meshd_static:StaticBackend"), info
        assert "static" not in refused
        assert "meshd_static" not in sys.modules, "available() imported the plugin"
        cls, loaded = load("static")
        assert "meshd_static" in sys.modules
        assert cls.__name__ == "StaticBackend" and loaded.name == "static"
        print("ok")
        """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "ok\n"


def test_unknown_plugin_lists_the_installed_ones() -> None:
    with pytest.raises(PluginError, match=r"no discovery plugin named 'nope' is installed "
                                          r"\(installed: .*static"):
        load("nope")


def test_plugin_whose_import_fails_names_its_distribution(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_distribution(tmp_path, "broken-plugin", "9.9", {"broken": "meshd_test_broken:Backend"})
    tmp_path.joinpath("meshd_test_broken.py").write_text(
        'raise RuntimeError("cannot talk to the registry")\n')
    monkeypatch.syspath_prepend(str(tmp_path))

    plugins, _ = available()
    assert plugins["broken"].describe() == "broken from broken-plugin 9.9"
    with pytest.raises(PluginError) as info:
        load("broken")
    message = str(info.value)
    assert "from distribution broken-plugin 9.9" in message
    assert "RuntimeError: cannot talk to the registry" in message
    assert isinstance(info.value.__cause__, RuntimeError)


def test_plugin_that_is_not_a_backend_class(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_distribution(tmp_path, "odd-plugin", "1.0", {"odd": "meshd_test_odd:NOT_A_CLASS"})
    tmp_path.joinpath("meshd_test_odd.py").write_text("NOT_A_CLASS = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match=r"odd-plugin: meshd_test_odd:NOT_A_CLASS is not a "
                                          r"backend class with a watch\(\) method"):
        load("odd")


def test_duplicate_names_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_distribution(tmp_path, "dup-one", "1.0", {"dup": "meshd_test_dup_one:Backend"})
    fake_distribution(tmp_path, "dup-two", "2.0", {"dup": "meshd_test_dup_two:Backend"})
    monkeypatch.syspath_prepend(str(tmp_path))

    plugins, refused = available()
    assert "dup" not in plugins
    assert refused["dup"] == "published by more than one distribution: dup-one, dup-two"
    assert "static" in plugins  # the others are unaffected
    with pytest.raises(PluginError, match="'dup' refused: .*dup-one, dup-two"):
        load("dup")


# -- the static plugin ---------------------------------------------------------------------

def test_static_endpoints_from_strings_and_tables() -> None:
    backend = StaticBackend("local", {"services": {
        "web": ["127.0.0.1:8081", "[::1]:8082"],
        "api": [{"address": "10.0.0.5:80", "weight": 3, "zone": "a", "meshed": True},
                {"address": "10.0.0.6:80"}],
        "none": [],
    }})
    assert tuple(backend.services()) == ("web", "api", "none")
    assert next(backend.watch("web")) == Reset((Endpoint("127.0.0.1", 8081),
                                                Endpoint("::1", 8082)))
    assert next(backend.watch("api")) == Reset((Endpoint("10.0.0.5", 80, 3, "a", True),
                                                Endpoint("10.0.0.6", 80, 1, "", False)))
    assert next(backend.watch("none")) == Reset(())


def test_static_unknown_service() -> None:
    backend = StaticBackend("local", {"services": {"web": ["127.0.0.1:1"]}})
    assert next(backend.watch("db")) == NoSuchService()


def test_static_watch_yields_once_then_blocks() -> None:
    code = textwrap.dedent("""\
        import threading
        from meshd_static import StaticBackend
        watch = StaticBackend("s", {"services": {"web": ["127.0.0.1:1"]}}).watch("web")
        print(type(next(watch)).__name__, flush=True)
        t = threading.Thread(target=next, args=(watch,), daemon=True)
        t.start()
        t.join(0.5)
        print("blocked" if t.is_alive() else "returned", flush=True)
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Reset", "blocked"]


def test_static_no_services_key() -> None:
    backend = StaticBackend("local", {})
    assert tuple(backend.services()) == ()
    assert next(backend.watch("web")) == NoSuchService()


def test_static_bad_entries_name_their_key_paths() -> None:
    with pytest.raises(ConfigError) as info:
        StaticBackend("local", {
            "servicez": 1,
            "services": {
                "web": ["127.0.0.1:8081", "nohost", 42, {"address": "10.0.0.1:80", "port": 1}],
                "api": [{"address": "10.0.0.5:80", "weight": -1},
                        {"address": "10.0.0.5:81", "weight": True},
                        {"address": "10.0.0.5:82", "meshed": "yes"},
                        {"weight": 2}],
                "db": "127.0.0.1:5432",
            },
        })
    assert info.value.problems == [
        ("servicez", "unknown key"),
        ("services.web[1]", """expected "host:port" (IPv6 as "[::1]:port"), got 'nohost'"""),
        ("services.web[2]", """expected "host:port" or a table with address, got 42"""),
        ("services.web[3]", "unknown key 'port'"),
        ("services.api[0]", "weight: expected a non-negative integer, got -1"),
        ("services.api[1]", "weight: expected a non-negative integer, got True"),
        ("services.api[2]", "zone must be a string and meshed a boolean"),
        ("services.api[3]", """expected "host:port" (IPv6 as "[::1]:port"), got None"""),
        ("services.db", "expected a list of endpoints"),
    ]


def test_static_services_must_be_a_table() -> None:
    with pytest.raises(ConfigError) as info:
        StaticBackend("local", {"services": ["127.0.0.1:1"]})
    assert info.value.problems == [("services", "expected a table of service = [endpoints]")]
