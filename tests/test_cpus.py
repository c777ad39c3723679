"""``workers = "auto"``: the CPUs the process may use (affinity, cgroup v2 cpu.max, cgroup
v1 CFS quota, on its cgroup or an ancestor), read from fake cgroup trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshd.cpus import cgroup_cpu_limit, usable_cpus

AFFINITY = len(os.sched_getaffinity(0))


def tree(tmp_path: Path, self_cgroup: str, files: dict[str, str]) -> tuple[str, str]:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "self_cgroup"
    proc.write_text(self_cgroup)
    return str(root), str(proc)


@pytest.mark.parametrize(("cpu_max", "cpus"), [
    ("150000 100000\n", 1.5), ("200000 100000\n", 2.0), ("50000 100000\n", 0.5),
    ("max 100000\n", None), ("garbage\n", None),
])
def test_cgroup_v2_cpu_max_in_the_containers_own_cgroup(tmp_path: Path, cpu_max: str,
                                                         cpus: float | None) -> None:
    root, proc = tree(tmp_path, "0::/\n", {"cpu.max": cpu_max})
    assert cgroup_cpu_limit(root, proc) == cpus


def test_cgroup_v2_the_tightest_ancestor_wins(tmp_path: Path) -> None:
    root, proc = tree(tmp_path, "0::/kubepods/pod1/c1\n", {
        "kubepods/cpu.max": "800000 100000\n",
        "kubepods/pod1/cpu.max": "100000 100000\n",   # the pod's limit: one CPU
        "kubepods/pod1/c1/cpu.max": "max 100000\n",
    })
    assert cgroup_cpu_limit(root, proc) == 1.0
    assert usable_cpus(root, proc) == 1


def test_cgroup_v1_cfs_quota(tmp_path: Path) -> None:
    root, proc = tree(tmp_path, "12:cpu,cpuacct:/docker/abc\n11:memory:/docker/abc\n", {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "150000\n",
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
    })
    assert cgroup_cpu_limit(root, proc) == 1.5
    assert usable_cpus(root, proc) == min(AFFINITY, 2)  # rounded up
    root, proc = tree(tmp_path / "b", "12:cpu,cpuacct:/\n", {
        "cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_limit(root, proc) is None


def test_no_cgroup_means_the_affinity_mask(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(str(tmp_path / "none"), str(tmp_path / "none")) is None
    assert usable_cpus(str(tmp_path / "none"), str(tmp_path / "none")) == AFFINITY


def test_a_quota_above_the_affinity_mask_does_not_raise_the_count(tmp_path: Path) -> None:
    root, proc = tree(tmp_path, "0::/\n", {"cpu.max": f"{(AFFINITY + 8) * 100000} 100000\n"})
    assert usable_cpus(root, proc) == AFFINITY


def test_a_fraction_of_a_cpu_is_still_one_worker(tmp_path: Path) -> None:
    root, proc = tree(tmp_path, "0::/\n", {"cpu.max": "10000 100000\n"})
    assert usable_cpus(root, proc) == 1


def test_workers_auto_uses_the_usable_cpus(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    from meshd import cpus
    from meshd.config import parse
    root, proc = tree(tmp_path, "0::/\n", {"cpu.max": "100000 100000\n"})
    monkeypatch.setattr(cpus, "CGROUP_ROOT", root)
    monkeypatch.setattr(cpus, "SELF_CGROUP", proc)
    cfg = parse({"workers": "auto", "listener": [{"name": "o", "listen": "127.0.0.1:0"}]})
    assert cfg.workers == 1
