"""The worker threads ("lanes") that run model passes on each device.

A GPU has one lane: its batches run one after another. A CPU device has `cpu_workers` lanes (2 by default when
there are 2+ cores): two batches run at once, each lane with its own copy of every model (`ServedModel.active_network`
resolves to the calling lane's copy), and torch's intra-op threads are split between the busy lanes. Why: several
single-threaded passes at once use a small machine's cores better than one multi-threaded pass, whose OpenMP
barriers wait on cores that other work (decoding, HTTP) keeps interrupting (figures in the README's benchmark section).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch

from service.model.served import use_copy

# torch's intra-op thread count of the process as started (the cores, or OMP_NUM_THREADS).
COMPUTE_THREADS = torch.get_num_threads()


def use_threads(count: int) -> None:
    """Set the calling thread's torch intra-op thread count.

    torch gives a thread the process-wide count (the last one any thread set) on its first parallel operation, which
    would undo a count set before it: `get_num_threads()` makes that first initialisation happen now.
    """
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


def use_one_thread() -> None:
    """Thread initializer of the decode pool: its small tensor operations (ToTensor, Normalize, map rendering) run
    single-threaded instead of competing for the cores with a team of intra-op threads each."""
    use_threads(1)


def default_cpu_lanes() -> int:
    return 2 if COMPUTE_THREADS >= 2 else 1


def lane_count(device: torch.device, cpu_workers: int | None) -> int:
    """How many lanes the device gets: `cpu_workers` (default `default_cpu_lanes()`) on a CPU, one on a GPU."""
    return (cpu_workers or default_cpu_lanes()) if device.type == "cpu" else 1


class _LaneExecutor(ThreadPoolExecutor):
    """One lane's thread; every call it runs is counted as busy for the lanes' thread split."""

    def __init__(self, lanes: DeviceLanes, index: int) -> None:
        super().__init__(max_workers=1, thread_name_prefix=f"device-{lanes.device}-{index}",
                         initializer=lanes._enter, initargs=(index,))
        self._lanes = lanes

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        return super().submit(self._lanes._run, fn, args, kwargs)


class DeviceLanes:
    """The lanes of one device: hands out free lanes to batch queues and splits the threads between them."""

    def __init__(self, device: torch.device, count: int, threads: int = COMPUTE_THREADS) -> None:
        self.device = device
        self.threads = threads
        self._lock = threading.Lock()
        self._busy = 0
        self.executors = [_LaneExecutor(self, index) for index in range(count)]
        self._free: asyncio.LifoQueue[int] | None = None

    @property
    def count(self) -> int:
        return len(self.executors)

    async def acquire(self) -> int:
        """Wait for a lane no batch queue is using; give it back with `release`.

        The lane freed last is handed out first, so under light load one lane (its thread and caches warm) does
        all the work; waiting callers are served in arrival order.
        """
        if self._free is None:
            self._free = asyncio.LifoQueue()
            for index in reversed(range(self.count)):
                self._free.put_nowait(index)
        return await self._free.get()

    def release(self, index: int) -> None:
        assert self._free is not None
        self._free.put_nowait(index)

    def executor(self, index: int) -> ThreadPoolExecutor:
        return self.executors[index]

    def _enter(self, index: int) -> None:
        use_copy(index)
        use_threads(self.threads)

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with self._lock:
            self._busy += 1
            busy = self._busy
        use_threads(max(1, self.threads // busy))
        try:
            return fn(*args, **kwargs)
        finally:
            with self._lock:
                self._busy -= 1

    def shutdown(self) -> None:
        for executor in self.executors:
            executor.shutdown(wait=True)


class DeviceWorkers:
    """The lanes of every device in use, created on first use."""

    def __init__(self, cpu_workers: int | None = None) -> None:
        self.cpu_workers = cpu_workers
        self._lanes: dict[str, DeviceLanes] = {}

    def lanes(self, device: torch.device) -> DeviceLanes:
        key = str(device)
        if key not in self._lanes:
            self._lanes[key] = DeviceLanes(device, lane_count(device, self.cpu_workers))
        return self._lanes[key]

    def for_device(self, device: torch.device) -> ThreadPoolExecutor:
        """The device's first lane: warm-up, shape probes and visualization steps run there."""
        return self.lanes(device).executor(0)

    def shutdown(self) -> None:
        for lanes in self._lanes.values():
            lanes.shutdown()
        self._lanes.clear()
