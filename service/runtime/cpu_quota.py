"""How many CPUs this process may really use: the container's CPU quota and the process's CPU affinity.

torch sizes its intra-op thread pool from the cores it sees (the host's, in a container), not from the container's
CPU limit. A pod limited to 2 CPUs on a 64-core node would run 64-thread OpenMP teams that the kernel throttles to
2 CPUs' worth of time per period: every parallel region then waits on throttled threads. The limit is the cgroup's
CPU quota, read here from the cgroup filesystem as the container sees it (its own cgroup is mounted at the root of
/sys/fs/cgroup: the default for Docker and Kubernetes on cgroup v2, and what they bind-mount on cgroup v1):

- cgroup v2: `cpu.max` holds "QUOTA PERIOD" (microseconds), or "max PERIOD" when unlimited;
- cgroup v1: `cpu/cpu.cfs_quota_us` (-1 when unlimited) and `cpu/cpu.cfs_period_us` (also looked up in
  `cpu,cpuacct/` and at the root).

The CPUs = ceil(quota / period) (a 1.5-CPU limit gets 2 threads), at most the CPUs of the affinity mask
(`taskset`, `docker --cpuset-cpus`, Kubernetes' static CPU manager). Pure standard library, no torch: the caller
(service/runtime/devices.py) applies the count.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 mounts the cpu controller on its own or together with cpuacct (cpu is then usually a symlink to it).
_V1_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu", ".")


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _ratio(quota: int, period: int) -> float | None:
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPUs the cgroup's quota allows (quota / period, possibly fractional), or None when there is no quota
    (unlimited, no cgroup filesystem, or files that cannot be read or parsed)."""
    v2 = _read(root / "cpu.max")
    if v2 is not None:
        fields = v2.split()
        if len(fields) == 2 and fields[0] != "max":
            try:
                return _ratio(int(fields[0]), int(fields[1]))
            except ValueError:
                return None
        return None
    for directory in _V1_DIRS:
        quota, period = _read(root / directory / "cpu.cfs_quota_us"), _read(root / directory / "cpu.cfs_period_us")
        if quota is not None and period is not None:
            try:
                return _ratio(int(quota), int(period))
            except ValueError:
                return None
    return None


def affinity_cpus() -> int:
    """The CPUs this process may be scheduled on (its affinity mask; all the CPUs where there is no such call)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class CpuBudget:
    """The CPUs the process may use and where the number comes from."""

    cpus: int
    quota: float | None  # the cgroup quota in CPUs, None when unlimited
    affinity: int

    @property
    def reason(self) -> str:
        quota = "none" if self.quota is None else f"{self.quota:g} CPUs"
        return f"cgroup CPU quota {quota}, CPU affinity {self.affinity}"


def effective_cpus(root: Path = CGROUP_ROOT, affinity: int | None = None) -> CpuBudget:
    """ceil(quota / period) of the cgroup, at most `affinity` CPUs (default: the process's affinity mask); at least 1."""
    affinity = affinity_cpus() if affinity is None else affinity
    quota = cgroup_cpu_limit(root)
    cpus = affinity if quota is None else min(affinity, math.ceil(quota))
    return CpuBudget(max(1, cpus), quota, affinity)


def quota_thread_count(current: int, environ: Mapping[str, str] | None = None, root: Path = CGROUP_ROOT,
                       affinity: int | None = None) -> tuple[int, str]:
    """The intra-op thread count to use and why, given torch's `current` count.

    OMP_NUM_THREADS set: `current` (what torch made of it: the operator's explicit choice). Otherwise the CPUs the
    quota and the affinity allow, but never more than `current` (torch's default is the physical cores, and a count
    lowered before, e.g. by `bench --threads`, stays).
    """
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS"):
        return current, f"OMP_NUM_THREADS={environ['OMP_NUM_THREADS']}"
    budget = effective_cpus(root, affinity)
    if budget.cpus < current:
        return budget.cpus, f"{budget.reason}: lowered from torch's {current}"
    return current, f"torch's default ({budget.reason})"
