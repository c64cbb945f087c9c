"""The machine, device and library versions a benchmark ran with."""

from __future__ import annotations

import datetime as dt
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from benchmarks.cpu import cpu_count

PACKAGES = ("torch", "timm", "numpy", "pillow", "fastapi", "starlette", "uvicorn", "grad-cam", "captum")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def git_revision(root: Path) -> str | None:
    try:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                  timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return revision + ("+uncommitted" if dirty else "")


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).date().isoformat(),
        "timestamp_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_cores": cpu_count(),
        "memory_gib": memory_gib(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": None,
        "cuda": torch.version.cuda,
        "versions": {name: _version(name) for name in PACKAGES},
        "git": git_revision(Path(__file__).resolve().parents[1]),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_summary(info: dict[str, Any]) -> str:
    memory = f", {info['memory_gib']} GiB" if info.get("memory_gib") else ""
    gpu = info["gpu"] or "no GPU"
    return f"{info['cpu_cores']} cores ({info['cpu'] or 'unknown CPU'}){memory}, {gpu}"
