"""The batch queue on its own: batching, isolation of failures, back-pressure, timeouts, draining."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import pytest

from service.runtime.batching import BatchQueue, QueueClosedError, QueueFullError, RequestTimeoutError

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
