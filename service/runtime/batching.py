"""A bounded async queue per model whose consumer forms batches and runs them on the device's lanes.

The consumer takes the first waiting request, waits for a free lane of the device (shared with the other models on
it), then adds whatever else is waiting, up to `max_batch_size` (divided by the device's lane count, rounded up)
or until `max_wait_ms` after the first request, and starts the batch without waiting for it to finish: with two
CPU lanes the next batch forms and runs while the previous one is still computing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable, Generic, Protocol, Sequence, TypeVar

log = logging.getLogger(__name__)

P = TypeVar("P")
R = TypeVar("R")

# Processes the payloads of one batch and returns one result per payload, in order. A result that is an
# exception instance fails only its own item. Raising fails the batch, which is then retried item by item.
BatchProcessor = Callable[[Sequence[P]], Sequence[Any]]


class Lanes(Protocol):
    """Worker threads that run one batch each at a time (`service.runtime.devices.DeviceLanes`)."""

    @property
    def count(self) -> int: ...

    async def acquire(self) -> int: ...

    def release(self, index: int) -> None: ...

    def executor(self, index: int) -> Executor: ...


def lane_batch_cap(max_batch_size: int, lanes: int) -> int:
    """The largest batch formed with `lanes` lanes: the cap divided by the lanes, rounded up. Under load the requests
    in flight are then shared evenly instead of one lane getting a large batch (long waits) and another a small one."""
    return -(-max_batch_size // lanes)


class SingleLane:
    """One executor as a single lane (tests, and callers without device lanes)."""

    count = 1

    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self._free: asyncio.Lock | None = None

    async def acquire(self) -> int:
        if self._free is None:
            self._free = asyncio.Lock()
        await self._free.acquire()
        return 0

    def release(self, index: int) -> None:
        assert self._free is not None
        self._free.release()

    def executor(self, index: int) -> Executor:
        return self._executor


class QueueFullError(RuntimeError):
    """The model's queue holds `queue_size` requests already."""


class QueueClosedError(RuntimeError):
    """The queue no longer accepts work (the server is shutting down)."""


class RequestTimeoutError(TimeoutError):
    """The request's result did not arrive within its timeout."""


@dataclass(frozen=True)
class BatchedResult(Generic[R]):
    """One item's result with how it was served."""

    value: R
    batch_size: int
    queue_ms: float
    compute_ms: float


@dataclass
class _Pending:
    payload: Any
    future: asyncio.Future
    enqueued_at: float


@dataclass(frozen=True)
class BatchStats:
    """Reported to an observer after each batch."""

    queue_name: str
    batch_size: int
    compute_s: float
    failed_items: int


class BatchQueue(Generic[P, R]):
    """Collects requests until `max_batch_size` or `max_wait_ms` after the first, then runs them as one batch."""

    def __init__(
        self,
        name: str,
        process: BatchProcessor,
        lanes: Lanes | Executor,
        *,
        max_batch_size: int,
        max_wait_ms: float,
        queue_size: int,
        timeout_s: float,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self.name = name
        self._process = process
        self._lanes: Lanes = SingleLane(lanes) if isinstance(lanes, Executor) else lanes
        self.max_batch_size = max_batch_size
        self.batch_cap = lane_batch_cap(max_batch_size, self._lanes.count)
        self.max_wait_s = max_wait_ms / 1000.0
        self.timeout_s = timeout_s
        self.queue_size = queue_size
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._held = 0  # taken off the queue by the consumer, waiting for a free lane
        self._on_batch = on_batch
        self._consumer: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def depth(self) -> int:
        """Requests waiting to be batched."""
        return self._queue.qsize() + self._held

    def start(self) -> None:
        if self._consumer is None:
            self._consumer = asyncio.get_running_loop().create_task(self._consume(), name=f"batch-queue-{self.name}")

    async def submit(self, payload: P, timeout_s: float | None = None) -> BatchedResult[R]:
        """Enqueue one item and wait for its result."""
        if self._closed:
            raise QueueClosedError(f"model {self.name!r} is shutting down")
        loop = asyncio.get_running_loop()
        if self.depth >= self.queue_size:
            raise QueueFullError(f"model {self.name!r} has {self.queue_size} requests waiting already")
        pending = _Pending(payload, loop.create_future(), time.perf_counter())
        self._queue.put_nowait(pending)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(timeout):
                return await pending.future
        except TimeoutError:
            pending.future.cancel()
            raise RequestTimeoutError(
                f"model {self.name!r} did not answer within {timeout:g}s"
            ) from None
        finally:
            if not pending.future.done():  # the client went away: nobody wants this result any more
                pending.future.cancel()

    async def close(self) -> None:
        """Stop accepting work, answer everything already accepted, then stop the consumer."""
        self._closed = True
        await self._queue.join()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        if self._consumer is not None:
            self._consumer.cancel()
            try:
                await self._consumer
            except asyncio.CancelledError:
                pass
            self._consumer = None

    async def _collect(self, first: _Pending) -> list[_Pending]:
        batch = [first]
        deadline = first.enqueued_at + self.max_wait_s
        while len(batch) < self.batch_cap:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    batch.append(await self._queue.get())
            except TimeoutError:
                break
        return batch

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            self._held = 1
            try:
                lane = await self._lanes.acquire()
            finally:
                self._held = 0
            try:
                batch = await self._collect(first)
            except BaseException:
                self._lanes.release(lane)
                self._queue.task_done()
                raise
            task = loop.create_task(self._run_on(lane, batch), name=f"batch-{self.name}")
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run_on(self, lane: int, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        try:
            live = [p for p in batch if not p.future.done()]
            if live:
                started = time.perf_counter()
                outcomes = await loop.run_in_executor(self._lanes.executor(lane), self._run_batch,
                                                      [p.payload for p in live])
                compute_s = time.perf_counter() - started
                self._deliver(live, outcomes, started, compute_s)
        except Exception:  # noqa: BLE001 - a batch must always answer its items
            log.exception("batch queue %r: unexpected failure", self.name)
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(RuntimeError("internal error while batching"))
        finally:
            self._lanes.release(lane)
            for _ in batch:
                self._queue.task_done()

    def _run_batch(self, payloads: list[Any]) -> list[Any]:
        """Runs on a lane's thread. A failed batch is retried item by item."""
        try:
            outcomes = list(self._process(payloads))
            if len(outcomes) != len(payloads):
                raise RuntimeError(f"processor returned {len(outcomes)} results for {len(payloads)} items")
            return outcomes
        except Exception as batch_error:  # noqa: BLE001
            if len(payloads) == 1:
                return [batch_error]
            log.warning("batch of %d on %r failed (%s); retrying item by item", len(payloads), self.name,
                        batch_error)
            results: list[Any] = []
            for payload in payloads:
                try:
                    results.extend(self._process([payload]))
                except Exception as item_error:  # noqa: BLE001
                    results.append(item_error)
            return results

    def _deliver(self, live: list[_Pending], outcomes: list[Any], started: float, compute_s: float) -> None:
        failed = 0
        for pending, outcome in zip(live, outcomes):
            if isinstance(outcome, BaseException):
                failed += 1
            if pending.future.done():
                continue
            if isinstance(outcome, BaseException):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(
                    BatchedResult(
                        value=outcome,
                        batch_size=len(live),
                        queue_ms=(started - pending.enqueued_at) * 1000.0,
                        compute_ms=compute_s * 1000.0,
                    )
                )
        if self._on_batch is not None:
            self._on_batch(BatchStats(self.name, len(live), compute_s, failed))
