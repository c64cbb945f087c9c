"""CPU accounting from /proc (Linux): CPU seconds of given processes, and of everything else on the machine.

The benchmark shares the machine's cores with its own load generator and, on a busy developer machine, with other
programs. Every measurement therefore records how much CPU the server, the client and the rest of the machine used,
so a reader can tell a clean figure from a contaminated one. Elsewhere than Linux every figure is None.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(path: str) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) from a /proc/<pid>/stat file."""
    try:
        with open(path, encoding="ascii") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, IndexError, ValueError):
        return None


def tree_cpu_s(pid: int | None = None) -> float | None:
    """CPU seconds of a process and all its live descendants (a server whose workers are child processes, e.g.
    LitServe's), or None when unavailable."""
    root = pid if pid is not None else os.getpid()
    own = _stat(f"/proc/{root}/stat")
    if own is None:
        return None
    children: dict[int, list[tuple[int, float]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != root:
            stat = _stat(f"/proc/{entry}/stat")
            if stat is not None:
                children.setdefault(stat[0], []).append((int(entry), stat[1]))
    total, pending = own[1], [root]
    while pending:
        for child, seconds in children.get(pending.pop(), []):
            total += seconds
            pending.append(child)
    return total


def machine_busy_s() -> tuple[float, float] | tuple[None, None]:
    """CPU seconds since boot that all cores spent busy (everything but idle, iowait and steal), and stolen (a
    virtual machine's cores running other guests: the hypervisor's share, invisible as processes here)."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None, None
    user, nice, system, idle, iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / _TICKS, steal / _TICKS


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class CpuSnapshot:
    wall: float
    machine: float | None
    steal: float | None
    processes: dict[str, float | None]


def snapshot(pids: dict[str, int | None]) -> CpuSnapshot:
    """`pids` maps a role (server, client, bench) to a pid (None: this process); each counts with its descendants."""
    busy, steal = machine_busy_s()
    return CpuSnapshot(time.perf_counter(), busy, steal, {role: tree_cpu_s(pid) for role, pid in pids.items()})


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def cpu_usage(start: CpuSnapshot, end: CpuSnapshot) -> dict[str, object]:
    """CPU used between two snapshots, in cores (CPU seconds per wall second) per role and for the rest.

    `other_cores` is the machine's busy time minus the listed processes': programs that are not part of the
    benchmark; `steal_cores`, time the hypervisor gave to other virtual machines. `client_share` is the client's fraction of the CPU the server and the client used together.
    """
    wall = max(end.wall - start.wall, 1e-9)
    used: dict[str, float | None] = {}
    for role, before in start.processes.items():
        after = end.processes.get(role)
        used[role] = None if before is None or after is None else max(after - before, 0.0)
    result: dict[str, object] = {"wall_s": round(wall, 3), "cores_available": cpu_count()}
    for role, seconds in used.items():
        result[f"{role}_cores"] = _round(None if seconds is None else seconds / wall)
    other = None
    if start.machine is not None and end.machine is not None and all(v is not None for v in used.values()):
        other = max((end.machine - start.machine) - sum(v for v in used.values() if v is not None), 0.0) / wall
    result["other_cores"] = _round(other)
    result["steal_cores"] = (None if start.steal is None or end.steal is None
                             else _round(max(end.steal - start.steal, 0.0) / wall))
    server, client = used.get("server"), used.get("client")
    if server is not None and client is not None and server + client > 0:
        result["client_share"] = _round(client / (server + client))
    return result
