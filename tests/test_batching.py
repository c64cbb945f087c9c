"""The batch queue on its own: batching, isolation of failures, back-pressure, timeouts, abandoned work, draining."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import pytest

from service.runtime.batching import (
    BatchCancelledError, BatchQueue, QueueClosedError, QueueFullError, RequestTimeoutError, current_batch,
)

pytestmark = pytest.mark.anyio


class Recorder:
    """A processor that doubles numbers, records batch sizes and fails on negative inputs."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = gate

    def __call__(self, items: Sequence[int]) -> list[int]:
        if self.gate is not None:
            self.gate.wait(10)
        self.batches.append(list(items))
        if any(i < 0 for i in items):
            raise ValueError(f"negative input in {list(items)}")
        return [2 * i for i in items]


def make_queue(process, executor, **overrides) -> BatchQueue:
    options = dict(max_batch_size=8, max_wait_ms=50.0, queue_size=64, timeout_s=10.0)
    options.update(overrides)
    queue = BatchQueue("test", process, executor, **options)
    queue.start()
    return queue


@pytest.fixture
def executor():
    pool = ThreadPoolExecutor(1)
    yield pool
    pool.shutdown(wait=True)


async def test_concurrent_items_are_batched_and_each_gets_its_own_result(executor) -> None:
    recorder = Recorder()
    queue = make_queue(recorder, executor)
    results = await asyncio.gather(*(queue.submit(i) for i in range(20)))
    assert [r.value for r in results] == [2 * i for i in range(20)]
    assert max(len(b) for b in recorder.batches) == 8
    assert sorted(i for b in recorder.batches for i in b) == list(range(20))
    assert all(r.batch_size >= 1 for r in results) and max(r.batch_size for r in results) == 8
    await queue.close()


async def test_max_batch_size_one_disables_batching(executor) -> None:
    recorder = Recorder()
    queue = make_queue(recorder, executor, max_batch_size=1)
    results = await asyncio.gather(*(queue.submit(i) for i in range(5)))
    assert [len(b) for b in recorder.batches] == [1] * 5
    assert {r.batch_size for r in results} == {1}
    await queue.close()


async def test_a_failing_item_does_not_fail_its_batch_mates(executor) -> None:
    recorder = Recorder()
    queue = make_queue(recorder, executor)
    outcomes = await asyncio.gather(*(queue.submit(i) for i in (1, 2, -3, 4)), return_exceptions=True)
    assert [o.value for o in outcomes if not isinstance(o, BaseException)] == [2, 4, 8]
    assert isinstance(outcomes[2], ValueError)
    assert [1, 2, -3, 4] in recorder.batches  # the whole batch ran first, then item by item
    assert [-3] in recorder.batches and [1] in recorder.batches
    await queue.close()


async def test_per_item_exception_results_fail_only_that_item(executor) -> None:
    def process(items: Sequence[int]) -> list[object]:
        return [KeyError(i) if i == 2 else i for i in items]

    queue = make_queue(process, executor)
    outcomes = await asyncio.gather(*(queue.submit(i) for i in (1, 2, 3)), return_exceptions=True)
    assert outcomes[0].value == 1 and outcomes[2].value == 3
    assert isinstance(outcomes[1], KeyError)
    await queue.close()


async def test_full_queue_rejects_at_once(executor) -> None:
    gate = threading.Event()
    queue = make_queue(Recorder(gate), executor, max_batch_size=1, queue_size=2, max_wait_ms=0.0)
    first = asyncio.ensure_future(queue.submit(0))  # taken by the consumer, blocked in the processor
    await asyncio.sleep(0.05)
    waiting = [asyncio.ensure_future(queue.submit(i)) for i in (1, 2)]  # fill the queue
    await asyncio.sleep(0.05)
    with pytest.raises(QueueFullError):
        await queue.submit(3)
    gate.set()
    assert [r.value for r in await asyncio.gather(first, *waiting)] == [0, 2, 4]
    await queue.close()


async def test_timeout_raises_and_the_result_is_not_computed_for_nobody(executor) -> None:
    gate = threading.Event()
    recorder = Recorder(gate)
    queue = make_queue(recorder, executor, max_batch_size=1, max_wait_ms=0.0, timeout_s=0.2)
    blocked = asyncio.ensure_future(queue.submit(0))
    await asyncio.sleep(0.02)
    with pytest.raises(RequestTimeoutError):
        await queue.submit(1)  # waits behind the blocked batch
    gate.set()
    with pytest.raises(RequestTimeoutError):
        await blocked
    await queue.close()
    assert [1] not in recorder.batches  # abandoned before its batch formed: skipped


async def test_an_item_whose_caller_is_cancelled_before_its_batch_starts_is_never_computed(executor) -> None:
    gate = threading.Event()
    recorder = Recorder(gate)
    queue = make_queue(recorder, executor, max_batch_size=1, max_wait_ms=0.0)
    blocked = asyncio.ensure_future(queue.submit(0))
    await asyncio.sleep(0.02)
    gone = asyncio.ensure_future(queue.submit(1))  # waits behind the blocked batch
    await asyncio.sleep(0.02)
    gone.cancel()  # what a disconnecting client does to its handler
    await asyncio.gather(gone, return_exceptions=True)
    gate.set()
    assert (await blocked).value == 0
    await queue.close()
    assert [1] not in recorder.batches


class Chunked:
    """A processor doing long work in chunks, with a checkpoint before each chunk (as the explain pipeline does)."""

    def __init__(self, chunks: int = 10_000) -> None:
        self.chunks = chunks
        self.computed = 0  # chunks computed, over every call
        self.calls: list[list[int]] = []
        self.started = threading.Event()
        self.finished = threading.Event()

    def __call__(self, items: Sequence[int]) -> list[int]:
        self.calls.append(list(items))
        try:
            batch = current_batch(len(items))
            for _ in range(self.chunks):
                batch.checkpoint()
                self.computed += 1
                self.started.set()
                threading.Event().wait(0.001)
            return [2 * i for i in items]
        finally:
            self.finished.set()


async def test_a_running_batch_whose_items_all_time_out_stops_at_its_next_checkpoint_and_is_not_retried(
    executor,
) -> None:
    work = Chunked()
    queue = make_queue(work, executor, max_batch_size=2, max_wait_ms=20.0, timeout_s=0.3)
    outcomes = await asyncio.gather(queue.submit(1), queue.submit(2), return_exceptions=True)
    assert all(isinstance(o, RequestTimeoutError) for o in outcomes)
    at_timeout = work.computed
    assert work.started.is_set() and await asyncio.to_thread(work.finished.wait, 10)
    await queue.close()
    assert work.computed - at_timeout <= 2  # the chunk in flight, and one more at most
    assert work.calls == [[1, 2]]  # cancelled: not retried item by item


async def test_a_batch_with_an_item_still_wanted_runs_to_the_end_for_it(executor) -> None:
    work = Chunked(chunks=50)
    queue = make_queue(work, executor, max_batch_size=2, max_wait_ms=20.0)
    wanted = asyncio.ensure_future(queue.submit(1))
    gone = asyncio.ensure_future(queue.submit(2))
    assert await asyncio.to_thread(work.started.wait, 10)
    gone.cancel()
    assert (await wanted).value == 2
    assert work.computed == 50 and work.calls == [[1, 2]]
    await queue.close()


async def test_a_failed_batch_is_retried_only_for_the_items_still_wanted(executor) -> None:
    calls: list[list[int]] = []
    abandoned = threading.Event()

    def process(items: Sequence[int]) -> list[int]:
        calls.append(list(items))
        if len(items) > 1:
            abandoned.wait(10)  # the second item's caller leaves while the batch runs, then the batch fails
            raise ValueError("the batch failed")
        return [2 * i for i in items]

    queue = make_queue(process, executor, max_batch_size=2, max_wait_ms=20.0)
    wanted = asyncio.ensure_future(queue.submit(1))
    gone = asyncio.ensure_future(queue.submit(2))
    await asyncio.sleep(0.1)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    abandoned.set()
    assert (await wanted).value == 2
    await queue.close()
    assert calls == [[1, 2], [1]]


def test_outside_a_queue_every_item_is_wanted_and_checkpoints_pass() -> None:
    batch = current_batch(3)
    batch.checkpoint()
    assert [batch.wanted(i) for i in range(3)] == [True, True, True]
    assert BatchCancelledError.__mro__[1] is Exception  # not a TimeoutError/CancelledError: never mistaken for one


async def test_close_drains_accepted_requests_then_refuses_new_ones(executor) -> None:
    gate = threading.Event()
    queue = make_queue(Recorder(gate), executor, max_batch_size=2, max_wait_ms=0.0)
    accepted = [asyncio.ensure_future(queue.submit(i)) for i in range(6)]
    await asyncio.sleep(0.05)
    closing = asyncio.ensure_future(queue.close())
    await asyncio.sleep(0.05)
    with pytest.raises(QueueClosedError):
        await queue.submit(99)
    gate.set()
    await closing
    assert [r.value for r in await asyncio.gather(*accepted)] == [0, 2, 4, 6, 8, 10]


async def test_a_lone_request_on_an_idle_lane_starts_at_once_without_waiting_for_max_wait(executor) -> None:
    queue: BatchQueue = BatchQueue("idle", lambda items: [x * 2 for x in items], executor, max_batch_size=8,
                                   max_wait_ms=2000.0, queue_size=8, timeout_s=10)
    queue.start()
    started = time.perf_counter()
    result = await queue.submit(21)
    assert result.value == 42 and result.batch_size == 1
    assert time.perf_counter() - started < 1.0  # not held for max_wait_ms (2 s)
    await queue.close()


async def test_requests_arriving_while_every_lane_is_busy_wait_up_to_max_wait_and_are_batched(executor) -> None:
    release = threading.Event()
    sizes: list[int] = []

    def process(items):
        sizes.append(len(items))
        if items[0] == "block":
            release.wait(10)
        return list(items)

    queue: BatchQueue = BatchQueue("busy", process, executor, max_batch_size=8, max_wait_ms=300.0, queue_size=16,
                                   timeout_s=10)
    queue.start()
    blocker = asyncio.ensure_future(queue.submit("block"))
    await asyncio.sleep(0.05)  # the only lane is busy from now on
    first = asyncio.ensure_future(queue.submit("a"))
    await asyncio.sleep(0.01)
    release.set()  # the lane frees before max_wait_ms after "a": the batch still waits for followers
    await asyncio.sleep(0.05)
    rest = [asyncio.ensure_future(queue.submit(x)) for x in "bc"]
    results = await asyncio.gather(blocker, first, *rest)
    assert [r.value for r in results] == ["block", "a", "b", "c"]
    assert sizes == [1, 3]  # a, b and c in one batch: "a" waited for followers while the lane was busy
    await queue.close()


async def test_without_dispatch_when_idle_a_lone_request_waits_for_max_wait(executor) -> None:
    queue: BatchQueue = BatchQueue("patient", lambda items: list(items), executor, max_batch_size=8,
                                   max_wait_ms=300.0, queue_size=8, timeout_s=10, dispatch_when_idle=False)
    queue.start()
    started = time.perf_counter()
    first = asyncio.ensure_future(queue.submit("a"))
    await asyncio.sleep(0.1)
    second = await queue.submit("b")  # arrives within max_wait_ms of "a", the lane idle all along
    assert (await first).batch_size == 2 == second.batch_size
    assert time.perf_counter() - started >= 0.25
    await queue.close()
