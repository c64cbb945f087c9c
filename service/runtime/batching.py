"""A bounded async queue per model whose consumer forms batches and runs them on the device's lanes.

The consumer takes the first waiting request, waits for a free lane of the device (shared with the other models on
it), then adds whatever else is waiting, up to `max_batch_size` (divided by the device's lane count, rounded up),
and starts the batch without waiting for it to finish: with two CPU lanes the next batch forms and runs while the
previous one is still computing. When every lane was busy as the first request was taken, it also waits for more
requests until `max_wait_ms` after the first (they would wait for a lane anyway); when a lane was free, the batch
starts at once (no batching penalty for a lone client).

Abandoned work: an item whose requester has gone (its timeout passed, or its client disconnected and the waiting
coroutine was cancelled) is marked abandoned from the event loop. An abandoned item is not started: it is dropped
from its batch if the batch has not started yet. A batch already running reads the marks from its lane thread
through `current_batch()`: long work calls `RunningBatch.checkpoint()` between chunks, which raises
`BatchCancelledError` once every item of the batch is abandoned, and (on device lanes) lets another model's batch
waiting for a lane run first. A cancelled batch answers nobody and is not retried item by item.

Tracing (when the server installs an OpenTelemetry provider; service/http/tracing.py): a traced request gets a
`queue wait` span, from enqueueing to the start of its batch, and each batch serving traced requests a
`batch compute` span of its own trace, linked to the span of every such request (captured when it was submitted).
Untraced requests (tracing off) create no span.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Executor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Protocol, Sequence, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)  # the provider the server installs, else a no-op

P = TypeVar("P")
R = TypeVar("R")

# Processes the payloads of one batch and returns one result per payload, in order. A result that is an
# exception instance fails only its own item. Raising fails the batch, which is then retried item by item (the items
# still wanted only; BatchCancelledError is never retried). It may read `current_batch()` to stop abandoned work.
BatchProcessor = Callable[[Sequence[P]], Sequence[Any]]


class BatchCancelledError(Exception):
    """Every item of the running batch (or of the part of it being computed) has been abandoned."""


class RunningBatch:
    """Which items of the batch running on the calling lane thread someone still waits for.

    The abandoned marks are `threading.Event`s set on the event loop and read here, on the lane thread. `yield_lane`
    (given by device lanes) lets another queue's waiting batch run on this lane before the work goes on.
    """

    def __init__(self, abandoned: Sequence[threading.Event],
                 yield_lane: Callable[[], None] | None = None, kind_seconds: dict[str, float] | None = None) -> None:
        self._abandoned = list(abandoned)
        self._yield_lane = yield_lane
        # Compute time per work kind, as the processor reports it (shared by every view of the batch).
        self.kind_seconds: dict[str, float] = {} if kind_seconds is None else kind_seconds

    def __len__(self) -> int:
        return len(self._abandoned)

    def wanted(self, index: int) -> bool:
        """Whether someone still waits for item `index` of this batch."""
        return not self._abandoned[index].is_set()

    def any_wanted(self, indices: Sequence[int] | None = None) -> bool:
        """Whether someone still waits for at least one of `indices` (default: every item)."""
        return any(self.wanted(i) for i in (range(len(self)) if indices is None else indices))

    def subset(self, indices: Sequence[int]) -> RunningBatch:
        """The same batch seen as the listed items only (for a handler given part of the batch)."""
        return RunningBatch([self._abandoned[i] for i in indices], self._yield_lane, self.kind_seconds)

    def add_kind_seconds(self, kind: str, seconds: float) -> None:
        """Report that the batch's items of `kind` took `seconds` to compute (for the per-kind metrics)."""
        self.kind_seconds[kind] = self.kind_seconds.get(kind, 0.0) + seconds

    def checkpoint(self) -> None:
        """A chunk boundary of long work: raise BatchCancelledError when every item is abandoned, else let another
        queue's batch that waits for this lane run now (its own model copy; see DeviceLanes.yield_lane)."""
        if not self.any_wanted():
            raise BatchCancelledError(f"all {len(self)} items of the batch were abandoned")
        if self._yield_lane is not None:
            self._yield_lane()


_running = threading.local()


def current_batch(size: int | None = None) -> RunningBatch:
    """The batch the calling lane thread is running; outside a batch queue (direct calls, tests), a batch of `size`
    items that are all wanted and never yield."""
    batch = getattr(_running, "batch", None)
    if batch is None or (size is not None and len(batch) != size):
        return RunningBatch([threading.Event() for _ in range(size or 0)])
    return batch


class Lanes(Protocol):
    """Worker threads that run one batch each at a time (`service.runtime.devices.DeviceLanes`).

    `acquire(owner)` names the queue asking; lanes that can lend themselves mid-batch (`yield_lane`) lend only to
    another owner, whose batch runs its own model copy."""

    @property
    def count(self) -> int: ...

    async def acquire(self, owner: str | None = None) -> int: ...

    def release(self, index: int) -> None: ...

    def has_free_lane(self) -> bool: ...  # a lane is free now and nobody waits for one

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

    async def acquire(self, owner: str | None = None) -> int:
        if self._free is None:
            self._free = asyncio.Lock()
        await self._free.acquire()
        return 0

    def release(self, index: int) -> None:
        assert self._free is not None
        self._free.release()

    def has_free_lane(self) -> bool:
        return self._free is None or not self._free.locked()

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
    abandoned: threading.Event
    # The submitting request's span (invalid when it is not traced), and when its batch started (epoch ns).
    span_context: trace.SpanContext = trace.INVALID_SPAN_CONTEXT
    started_ns: int | None = None

    def abandon(self) -> None:
        """Nobody waits for this item any more: never start it, and let a running batch stop early."""
        self.abandoned.set()
        if not self.future.done():
            self.future.cancel()


def work_kind(payload: Any) -> str:
    """The kind of work an item is (`predict`, `explain`...): its class's `kind`, else the class name in lower case."""
    return getattr(type(payload), "kind", None) or type(payload).__name__.lower()


@dataclass(frozen=True)
class ItemStats:
    kind: str
    queue_wait_s: float  # from enqueueing to the start of its batch


@dataclass(frozen=True)
class BatchStats:
    """Reported to an observer after each batch."""

    queue_name: str
    batch_size: int
    compute_s: float
    failed_items: int
    items: tuple[ItemStats, ...] = ()
    # Per kind in the batch: (items, compute seconds). The processor's own timing of each kind when it reports one
    # (RunningBatch.add_kind_seconds), else the whole batch's time.
    kinds: dict[str, tuple[int, float]] = field(default_factory=dict)


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
        dispatch_when_idle: bool = True,
    ) -> None:
        self.name = name
        self.dispatch_when_idle = dispatch_when_idle
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
        pending = _Pending(payload, loop.create_future(), time.perf_counter(), threading.Event(),
                           trace.get_current_span().get_span_context())
        waiting = None  # a traced request's `queue wait`: ended when its batch starts (or its wait ends without one)
        if pending.span_context.is_valid:
            waiting = tracer.start_span("queue wait", attributes={"saliency.model": self.name,
                                                                   "saliency.kind": work_kind(payload)})
        self._queue.put_nowait(pending)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(timeout):
                return await pending.future
        except TimeoutError:
            pending.abandon()
            raise RequestTimeoutError(
                f"model {self.name!r} did not answer within {timeout:g}s"
            ) from None
        finally:
            # The caller was cancelled (its client went away): cancelling the task has cancelled the future too.
            if not pending.future.done() or pending.future.cancelled():
                pending.abandon()
            if waiting is not None:
                waiting.set_attribute("saliency.batch_started", pending.started_ns is not None)
                waiting.end(end_time=pending.started_ns)

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

    async def _collect(self, first: _Pending, wait: bool = True) -> list[_Pending]:
        """`first` and what else is waiting, up to the batch cap; with `wait`, also what arrives until `max_wait_ms`
        after `first` was enqueued."""
        batch = [first]
        deadline = first.enqueued_at + self.max_wait_s
        while len(batch) < self.batch_cap:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            if not wait:
                break
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
            # No batching penalty when idle: a lane free at once means the device has spare capacity, so the batch
            # starts with what is already waiting. Waiting up to max_wait_ms for more pays only while every lane is
            # busy (the next request would wait for a lane anyway).
            idle = self.dispatch_when_idle and self._lanes.has_free_lane()
            try:
                lane = await self._lanes.acquire(self.name)
            finally:
                self._held = 0
            try:
                batch = await self._collect(first, wait=not idle)
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
                started_ns = time.time_ns()
                for p in live:
                    p.started_ns = started_ns
                yield_lane = getattr(self._lanes, "yield_lane", None)
                running = RunningBatch([p.abandoned for p in live],
                                       None if yield_lane is None else lambda: yield_lane(lane, self.name))
                with self._batch_span(live, lane, started_ns) as batch_span:
                    outcomes = await loop.run_in_executor(self._lanes.executor(lane), self._run_batch,
                                                          [p.payload for p in live], running)
                    if batch_span is not None:
                        failed = sum(isinstance(outcome, BaseException) for outcome in outcomes)
                        batch_span.set_attribute("saliency.failed_items", failed)
                compute_s = time.perf_counter() - started
                self._deliver(live, outcomes, started, compute_s, running.kind_seconds)
        except Exception:  # noqa: BLE001 - a batch must always answer its items
            log.exception("batch queue %r: unexpected failure", self.name)
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(RuntimeError("internal error while batching"))
        finally:
            self._lanes.release(lane)
            for _ in batch:
                self._queue.task_done()

    def _batch_span(self, live: list[_Pending], lane: int, started_ns: int) -> AbstractContextManager[Any]:
        """The batch's `batch compute` span, a trace of its own linked to each traced request it serves; nothing
        when none of them is traced."""
        links = [trace.Link(p.span_context) for p in live if p.span_context.is_valid]
        if not links:
            return nullcontext()
        kinds = sorted({work_kind(p.payload) for p in live})
        return tracer.start_as_current_span(
            "batch compute", context=otel_context.Context(), links=links, start_time=started_ns,
            attributes={"saliency.model": self.name, "saliency.batch_size": len(live), "saliency.lane": lane,
                        "saliency.kinds": kinds},
        )

    def _call(self, payloads: list[Any], running: RunningBatch) -> list[Any]:
        """The processor on `payloads`, with `running` as the thread's current batch."""
        outer = getattr(_running, "batch", None)  # a batch this one was lent the lane by (DeviceLanes.yield_lane)
        _running.batch = running
        try:
            outcomes = list(self._process(payloads))
        finally:
            _running.batch = outer
        if len(outcomes) != len(payloads):
            raise RuntimeError(f"processor returned {len(outcomes)} results for {len(payloads)} items")
        return outcomes

    def _run_batch(self, payloads: list[Any], running: RunningBatch) -> list[Any]:
        """Runs on a lane's thread. A failed batch is retried item by item, skipping the abandoned items; a cancelled
        batch (every item abandoned) is not retried: each item gets the cancellation, which nobody receives."""
        try:
            return self._call(payloads, running)
        except BatchCancelledError as cancelled:
            return [cancelled] * len(payloads)
        except Exception as batch_error:  # noqa: BLE001
            if len(payloads) == 1:
                return [batch_error]
            log.warning("batch of %d on %r failed (%s); retrying item by item", len(payloads), self.name,
                        batch_error)
            results: list[Any] = []
            for i, payload in enumerate(payloads):
                if not running.wanted(i):
                    results.append(BatchCancelledError("abandoned before its retry"))
                    continue
                try:
                    results.extend(self._call([payload], running.subset([i])))
                except Exception as item_error:  # noqa: BLE001
                    results.append(item_error)
            return results

    def _deliver(self, live: list[_Pending], outcomes: list[Any], started: float, compute_s: float,
                 kind_seconds: dict[str, float] | None = None) -> None:
        failed = 0
        for pending, outcome in zip(live, outcomes):
            if pending.future.done():  # abandoned: neither answered nor counted as failed
                continue
            if isinstance(outcome, BaseException):
                failed += 1
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
            items = tuple(ItemStats(work_kind(p.payload), started - p.enqueued_at) for p in live)
            counts: dict[str, int] = {}
            for item in items:
                counts[item.kind] = counts.get(item.kind, 0) + 1
            kinds = {kind: (count, (kind_seconds or {}).get(kind, compute_s)) for kind, count in counts.items()}
            self._on_batch(BatchStats(self.name, len(live), compute_s, failed, items, kinds))
