"""Where a model runs: the device and dtype named in the configuration, checked against what this machine has."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """`auto` means cuda when available, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """float32 everywhere; float16 and bfloat16 only on CUDA."""
    dtype = DTYPES[name]
    if dtype != torch.float32 and device.type != "cuda":
        raise ValueError(f"dtype {name} is only supported on CUDA devices, not {device}")
    return dtype
