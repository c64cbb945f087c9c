"""torch's threads follow the container's CPU quota (service/runtime/cpu_quota.py): the cgroup v2 and v1 quota files
read from fake cgroup trees, the affinity mask as a second bound, OMP_NUM_THREADS as the operator's override, and
the count applied to torch when service/runtime/devices.py starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from service.runtime import devices
from service.runtime.cpu_quota import (
    cgroup_cpu_limit,
    effective_cpus,
    quota_thread_count,
)


def write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="ascii")
    return root


def test_a_cgroup_v2_quota_gives_its_cpus_rounded_up(tmp_path: Path) -> None:
    root = write(tmp_path, {"cpu.max": "150000 100000"})
    assert cgroup_cpu_limit(root) == 1.5
    budget = effective_cpus(root, affinity=8)
    assert budget.cpus == 2 and budget.quota == 1.5 and "1.5 CPUs" in budget.reason


def test_a_cgroup_v2_max_is_no_limit(tmp_path: Path) -> None:
    root = write(tmp_path, {"cpu.max": "max 100000"})
    assert cgroup_cpu_limit(root) is None
    assert effective_cpus(root, affinity=6).cpus == 6


@pytest.mark.parametrize("directory", ["cpu", "cpu,cpuacct"])
def test_a_cgroup_v1_quota_gives_its_cpus(tmp_path: Path, directory: str) -> None:
    root = write(tmp_path, {f"{directory}/cpu.cfs_quota_us": "300000", f"{directory}/cpu.cfs_period_us": "100000"})
    assert cgroup_cpu_limit(root) == 3
    assert effective_cpus(root, affinity=16).cpus == 3


def test_a_cgroup_v1_quota_of_minus_one_is_no_limit(tmp_path: Path) -> None:
    root = write(tmp_path, {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})
    assert cgroup_cpu_limit(root) is None
    assert effective_cpus(root, affinity=4).cpus == 4


def test_without_a_cgroup_filesystem_the_affinity_decides(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path / "absent") is None
    assert effective_cpus(tmp_path / "absent", affinity=5).cpus == 5


def test_an_affinity_smaller_than_the_quota_wins(tmp_path: Path) -> None:
    root = write(tmp_path, {"cpu.max": "800000 100000"})  # 8 CPUs of quota, pinned to 2
    assert effective_cpus(root, affinity=2).cpus == 2


def test_a_quota_under_one_cpu_still_gets_one_thread(tmp_path: Path) -> None:
    root = write(tmp_path, {"cpu.max": "20000 100000"})
    assert cgroup_cpu_limit(root) == pytest.approx(0.2)
    assert effective_cpus(root, affinity=4).cpus == 1


@pytest.mark.parametrize("text", ["garbage", "100000", "-5 100000", "100000 0", ""])
def test_an_unreadable_cpu_max_is_no_limit(tmp_path: Path, text: str) -> None:
    assert cgroup_cpu_limit(write(tmp_path, {"cpu.max": text})) is None


def test_the_quota_lowers_torchs_thread_count_but_never_raises_it(tmp_path: Path) -> None:
    root = write(tmp_path, {"cpu.max": "200000 100000"})
    threads, reason = quota_thread_count(16, environ={}, root=root, affinity=16)
    assert threads == 2 and "lowered from torch's 16" in reason
    # A count already lower (torch's default on fewer physical cores, or one set before) stays.
    assert quota_thread_count(1, environ={}, root=root, affinity=16)[0] == 1


def test_omp_num_threads_overrides_the_quota(tmp_path: Path) -> None:
    root = write(tmp_path, {"cpu.max": "100000 100000"})
    assert quota_thread_count(8, environ={"OMP_NUM_THREADS": "8"}, root=root, affinity=16) == (8, "OMP_NUM_THREADS=8")
    assert quota_thread_count(8, environ={"OMP_NUM_THREADS": ""}, root=root, affinity=16)[0] == 1  # empty: unset


def test_the_devices_module_applies_the_count_to_torch(monkeypatch) -> None:
    previous = torch.get_num_threads()
    monkeypatch.setattr(devices, "quota_thread_count", lambda current: (1, "cgroup CPU quota 1 CPUs"))
    try:
        assert devices._initial_threads() == (1, "cgroup CPU quota 1 CPUs")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
    # At import, the module took the count from the same function with torch's own count.
    assert devices.COMPUTE_THREADS >= 1 and devices.COMPUTE_THREADS_REASON
