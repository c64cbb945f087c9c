"""Device and dtype resolution, and one worker thread per device so GPU work is serialised."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# torch's intra-op thread count of the process as started (the cores, or OMP_NUM_THREADS): the device workers use
# it. torch.set_num_threads() in one thread also sets the count that threads started later begin with, so every
# pool sets its own count explicitly when its threads start.
COMPUTE_THREADS = torch.get_num_threads()


def use_compute_threads() -> None:
    """Thread initializer of the device workers: model passes use all of torch's intra-op threads."""
    torch.set_num_threads(COMPUTE_THREADS)


def use_one_thread() -> None:
    """Thread initializer of the decode pool: its small tensor operations (ToTensor, Normalize, map rendering) run
    single-threaded, instead of each decode thread starting its own team of intra-op threads that oversubscribe
    the cores the model needs (on 2 cores that doubled the CPU time of preprocessing an image)."""
    torch.set_num_threads(1)


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


class DeviceWorkers:
    """One single-thread executor per device: batches of every model on a device run one after another."""

    def __init__(self) -> None:
        self._executors: dict[str, ThreadPoolExecutor] = {}

    def for_device(self, device: torch.device) -> ThreadPoolExecutor:
        key = str(device)
        if key not in self._executors:
            self._executors[key] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"device-{key}",
                                                      initializer=use_compute_threads)
        return self._executors[key]

    def shutdown(self) -> None:
        for executor in self._executors.values():
            executor.shutdown(wait=True)
        self._executors.clear()
