"""How many cores this process may use: what the engine's thread default divides among replicas.

`os.cpu_count()` is the host's count. In a container with a CPU limit (docker --cpus, a Kubernetes
pod's limits.cpu) the kernel enforces a CFS quota instead, and torch threads past it only wait
for their turn; the process's affinity mask (taskset, cpusets) can be smaller too. Python 3.13's
os.process_cpu_count() reads the affinity but not the quota, so both are read here."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


def _own_path(self_cgroup: Path, v2: bool) -> Path:
    """This process's cgroup under the mount, from /proc/self/cgroup ("0::/a/b" for v2, "N:cpu,
    cpuacct:/a/b" for v1's cpu controller): "/" in a container with its own cgroup namespace,
    the full path where the host's hierarchy is mounted (no namespace)."""
    try:
        for line in self_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if (v2 and controllers == "") or (not v2 and "cpu" in controllers.split(",")):
                return Path(path.lstrip("/"))
    except (OSError, ValueError):
        pass
    return Path()


def _quota(directory: Path, v2: bool) -> float | None:
    """One cgroup directory's own quota in cores, None where it sets none or cannot be read."""
    try:
        if v2:
            quota, period = (directory / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota_us = int((directory / "cpu.cfs_quota_us").read_text())
        return None if quota_us <= 0 else quota_us / int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None


def cgroup_cpu_limit(root: Path = CGROUP, self_cgroup: Path = SELF_CGROUP) -> float | None:
    """The CPU quota in cores (cgroup v2 `cpu.max`, else v1 `cpu.cfs_quota_us` /
    `cpu.cfs_period_us`): the smallest set on this process's cgroup or any cgroup above it under
    the mount (a parent's limit binds its children), None where there is none or none can be read."""
    v2 = (root / "cgroup.controllers").is_file() or (root / "cpu.max").is_file()
    base = root if v2 or not (root / "cpu").is_dir() else root / "cpu"
    directory = base / _own_path(self_cgroup, v2)
    limits = []
    while True:
        limit = _quota(directory, v2)
        if limit is not None:
            limits.append(limit)
        if directory == base or base not in directory.parents:
            break
        directory = directory.parent
    return min(limits, default=None)


def usable_cores(root: Path = CGROUP) -> int:
    """min(affinity mask, ceil(cgroup quota)), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    return max(1, cores)
