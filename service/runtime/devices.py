"""The worker threads ("lanes") that run model passes on each device.

A GPU has one lane: its batches run one after another. A CPU device has `cpu_workers` lanes (2 by default when
there are 2+ cores): two batches run at once, each lane with its own copy of every model (`ServedModel.active_network`
resolves to the calling lane's copy), and torch's intra-op threads are split between the busy lanes (explanations
keep the lane's fixed share instead, so that their maps do not depend on the load: `steady_threads`). Why: several
single-threaded passes at once use a small machine's cores better than one multi-threaded pass, whose OpenMP
barriers wait on cores that other work (decoding, HTTP) keeps interrupting (figures in the README's benchmark section).

Fairness: a long batch (an explanation running the model hundreds of times) would hold its lane for its whole
duration, and on a GPU (one lane) starve every other model's predictions. So a running batch lends its lane at each
chunk boundary of its work (`RunningBatch.checkpoint` -> `yield_lane`): when another model's queue waits for a lane
of the device, that queue gets this lane, and its batch runs right there, on the lending lane's thread, before the
long batch goes on. The borrowed batch uses its own model's copy for this lane, so the lender's hooks and attention
switches (on its own copy) are never seen by it. A lane is never lent to the lender's own queue (same copy), and a
borrowed lane is not lent again (at most one batch is suspended under another). This was chosen over reserving
a lane for short work (impossible with a GPU's single lane) or a separate prediction thread (a batch mixes
predictions and explanations, and another thread would need another copy and threads on every device).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, Callable

import torch

from service.model.served import use_copy
from service.runtime import memory
from service.runtime.cpu_quota import quota_thread_count

log = logging.getLogger(__name__)


def _initial_threads() -> tuple[int, str]:
    """torch's intra-op thread count for the process: OMP_NUM_THREADS when set, else torch's default (the host's
    cores) lowered to the container's CPU quota and affinity (service/runtime/cpu_quota.py); set on torch now."""
    threads, reason = quota_thread_count(torch.get_num_threads())
    use_threads(threads)
    return threads, reason


def use_threads(count: int) -> None:
    """Set the calling thread's torch intra-op thread count.

    torch gives a thread the process-wide count (the last one any thread set) on its first parallel operation, which
    would undo a count set before it: `get_num_threads()` makes that first initialisation happen now.
    """
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


# The process's intra-op thread count, split between the CPU lanes, and where it comes from (logged with the lanes).
COMPUTE_THREADS, COMPUTE_THREADS_REASON = _initial_threads()


# The calling lane thread's fixed share of the threads (`steady_threads`); unset on other threads.
_lane = threading.local()


def steady_threads() -> None:
    """On a lane's thread: use the lane's fixed share of the threads (the device's threads divided by its lane count)
    whatever the number of busy lanes, for work whose result must not depend on the load (explanations: the order of
    a multi-threaded reduction changes with the thread count, and so do gradient maps, by up to 1.5e-2 of a min-max
    normalised map). Elsewhere, nothing. The lane's next call gets the usual split again (`DeviceLanes._run`)."""
    share = getattr(_lane, "share", None)
    if share is not None:
        use_threads(share)


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


class _Handoff(Executor):
    """The executor of a lent lane: calls go to the lending lane's thread, which runs them between two chunks."""

    def __init__(self, calls: queue.SimpleQueue) -> None:
        self._calls = calls

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        self._calls.put((future, fn, args, kwargs))
        return future


class DeviceLanes:
    """The lanes of one device: hands out free lanes to batch queues, lends a busy lane to another queue at a chunk
    boundary of a long batch (`yield_lane`), and splits the threads between the lanes."""

    # A call that ran at least this long (an explanation, not a prediction) and left every lane idle is followed,
    # on its lane's thread, by a `memory.trim_memory()`: the memory freed after a burst goes back to the system.
    trim_after_s = 0.2

    def __init__(self, device: torch.device, count: int, threads: int = COMPUTE_THREADS) -> None:
        self.device = device
        self.threads = threads
        self.share = max(1, threads // count)  # a lane's fixed share, for `steady_threads`
        self._lock = threading.Lock()
        self._busy = 0
        self.executors = [_LaneExecutor(self, index) for index in range(count)]
        self._free = list(reversed(range(count)))  # a stack: the lane freed last is on top
        # Only the event loop changes these; lane threads read `_waiting` (a tuple, replaced whole) and `_lent`.
        self._waiters: deque[tuple[str | None, asyncio.Future[int]]] = deque()
        self._waiting: tuple[str | None, ...] = ()  # the owners of the waiters, for the lane threads
        self._lent: dict[int, queue.SimpleQueue] = {}  # lane -> its lender's queue of calls, while lent
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def count(self) -> int:
        return len(self.executors)

    async def acquire(self, owner: str | None = None) -> int:
        """Wait for a lane no batch queue is using; give it back with `release`.

        The lane freed last is handed out first, so under light load one lane (its thread and caches warm) does
        all the work; waiting callers are served in arrival order. `owner` (the queue's name) decides which
        waiters a busy lane may be lent to (`yield_lane`).
        """
        self._loop = loop = asyncio.get_running_loop()
        if self._free and not self._waiters:
            return self._free.pop()
        future: asyncio.Future[int] = loop.create_future()
        entry = (owner, future)
        self._waiters.append(entry)
        self._snapshot_waiters()
        try:
            return await future
        except asyncio.CancelledError:
            if entry in self._waiters:
                self._waiters.remove(entry)
                self._snapshot_waiters()
            elif future.done() and not future.cancelled():  # handed a lane just as the caller was cancelled
                self.release(future.result())
            raise

    def has_free_lane(self) -> bool:
        """A lane is free now and no batch queue waits for one."""
        return bool(self._free) and not self._waiters

    def release(self, index: int) -> None:
        lender = self._lent.pop(index, None)
        if lender is not None:  # a borrowed lane: its lender goes on
            lender.put(None)
            return
        while self._waiters:
            _, future = self._waiters.popleft()
            self._snapshot_waiters()
            if not future.done():
                future.set_result(index)
                return
        self._free.append(index)

    def _snapshot_waiters(self) -> None:
        """On the event loop, after each change of the waiters: the owners waiting, as an immutable tuple that lane
        threads read in `yield_lane` without a lock."""
        self._waiting = tuple(owner for owner, _ in self._waiters)

    def executor(self, index: int) -> Executor:
        """Where the holder of lane `index` runs its batch: the lane's thread, or its lender while lent."""
        lender = self._lent.get(index)
        return self.executors[index] if lender is None else _Handoff(lender)

    def yield_lane(self, index: int, owner: str | None) -> None:
        """Called on lane `index`'s thread between two chunks of `owner`'s batch: if another owner's queue waits for
        a lane, lend it this one and run its batch here, then return. A lent lane is not lent again."""
        loop = self._loop
        if loop is None or index in self._lent or all(waiting == owner for waiting in self._waiting):
            return
        calls: queue.SimpleQueue = queue.SimpleQueue()
        loop.call_soon_threadsafe(self._lend, index, owner, calls)
        while (call := calls.get()) is not None:
            future, fn, args, kwargs = call
            if future.set_running_or_notify_cancel():
                try:
                    # A lane thread's own autograd modes, whatever mode the lender paused in.
                    with torch.inference_mode(False), torch.enable_grad():
                        future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # noqa: BLE001 - delivered to the borrower
                    future.set_exception(exc)

    def _lend(self, index: int, owner: str | None, calls: queue.SimpleQueue) -> None:
        """On the event loop: hand lane `index` to the first waiter of another owner; the lender's thread runs the
        borrower's calls until the borrower releases the lane (or at once goes on when nobody may borrow it)."""
        for entry in self._waiters:
            waiter, future = entry
            if waiter != owner and not future.done():
                self._waiters.remove(entry)
                self._snapshot_waiters()
                self._lent[index] = calls
                future.set_result(index)
                return
        calls.put(None)

    def _enter(self, index: int) -> None:
        use_copy(index)
        use_threads(self.threads)
        _lane.index = index
        _lane.share = self.share

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with self._lock:
            self._busy += 1
            busy = self._busy
        use_threads(max(1, self.threads // busy))
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            with self._lock:
                self._busy -= 1
                idle = self._busy == 0
            if idle and time.perf_counter() - started >= self.trim_after_s:
                self._trim_later()

    def _trim_later(self) -> None:
        """Queue a memory trim on the calling lane's thread, behind the call now ending: it runs once that call's
        result is delivered (no request waits for it), and is not counted as busy."""
        index = getattr(_lane, "index", None)
        if index is None or not memory.can_trim():
            return
        try:
            ThreadPoolExecutor.submit(self.executors[index], memory.trim_memory)
        except RuntimeError:  # shutting down
            pass

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
            if device.type == "cpu":
                log.info("%s: %d lanes sharing %d torch threads (%s)", device, self._lanes[key].count,
                         COMPUTE_THREADS, COMPUTE_THREADS_REASON)
        return self._lanes[key]

    def for_device(self, device: torch.device) -> ThreadPoolExecutor:
        """The device's first lane: warm-up, shape probes and visualization steps run there."""
        return self.lanes(device).executors[0]  # the thread itself, never a lent lane's handoff

    def shutdown(self) -> None:
        for lanes in self._lanes.values():
            lanes.shutdown()
        self._lanes.clear()
