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


def cgroup_cpu_limit(root: Path = CGROUP) -> float | None:
    """The CPU quota in cores (cgroup v2 `cpu.max`, else v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`),
    None where there is none or it cannot be read."""
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = root / "cpu" if (root / "cpu").is_dir() else root
        quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
        return None if quota_us <= 0 else quota_us / int((v1 / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None


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
