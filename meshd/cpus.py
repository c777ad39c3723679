"""How many CPUs this process may use: what ``workers = "auto"`` starts one worker for.

``os.cpu_count()`` is the node's count; in a container (a Kubernetes pod with a CPU
limit, a systemd unit with ``CPUQuota=``) the process may use far fewer. The usable count
is the smallest of the CPUs in the affinity mask (``os.sched_getaffinity``: cpusets,
``taskset``) and the CFS quota of the process's cgroup and each of its ancestors,
rounded up: cgroup v2 ``cpu.max`` ("200000 100000" is two CPUs, "max" none), or cgroup v1
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: none). Unreadable files mean no limit.
"""

from __future__ import annotations

import math
import os

CGROUP_ROOT = "/sys/fs/cgroup"
SELF_CGROUP = "/proc/self/cgroup"
MAX_DEPTH = 64  # cgroup path components walked up (bounded: the path comes from a file)


def usable_cpus(root: str | None = None, self_cgroup: str | None = None) -> int:
    """The CPUs this process may use, at least 1. ``root`` and ``self_cgroup`` are the
    cgroup mount and /proc/self/cgroup (default: CGROUP_ROOT, SELF_CGROUP; tests give
    fakes)."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = cgroup_cpu_limit(root or CGROUP_ROOT, self_cgroup or SELF_CGROUP)
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(count, 1)


def cgroup_cpu_limit(root: str = CGROUP_ROOT, self_cgroup: str = SELF_CGROUP) -> float | None:
    """The tightest CPU quota (in CPUs) on this process's cgroup or its ancestors; None
    when there is none (or no cgroup is readable)."""
    v2_path, v1_path = _own_paths(self_cgroup)
    limits: list[float] = []
    if v2_path is not None:
        for d in _ancestors(root, v2_path):
            limit = _read_cpu_max(os.path.join(d, "cpu.max"))
            if limit is not None:
                limits.append(limit)
    if v1_path is not None:
        for mount in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
            base = os.path.join(root, mount)
            if not os.path.isdir(base):
                continue
            for d in _ancestors(base, v1_path):
                limit = _read_cfs(d)
                if limit is not None:
                    limits.append(limit)
            break
    return min(limits) if limits else None


def _own_paths(self_cgroup: str) -> tuple[str | None, str | None]:
    """(cgroup v2 path, cgroup v1 cpu controller path) from /proc/self/cgroup."""
    v2 = v1 = None
    try:
        with open(self_cgroup) as f:
            lines = f.read(65536).splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hid, controllers, path = parts
        if controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(root: str, path: str) -> list[str]:
    """``root`` joined with ``path`` and each of its parents up to ``root`` itself. In a
    container with its own cgroup namespace the path is "/" and the mount is the
    container's own cgroup."""
    parts = [p for p in path.split("/") if p and p not in (".", "..")][:MAX_DEPTH]
    return [os.path.join(root, *parts[:n]) for n in range(len(parts), -1, -1)]


def _read_cpu_max(path: str) -> float | None:
    try:
        with open(path) as f:
            fields = f.read(256).split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _read_cfs(d: str) -> float | None:
    try:
        with open(os.path.join(d, "cpu.cfs_quota_us")) as f:
            quota = int(f.read(64).strip())
        with open(os.path.join(d, "cpu.cfs_period_us")) as f:
            period = int(f.read(64).strip())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None
