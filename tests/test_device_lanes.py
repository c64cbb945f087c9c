"""CPU lanes: two batches at once, each on its own thread with its own copy of the model and a share of the threads."""

from __future__ import annotations

import asyncio
import base64
import json
import threading

import numpy as np
import pytest
import torch

from service.runtime.batching import BatchQueue, current_batch
from service.model.served import copy_in_use
from service.runtime.devices import DeviceLanes, default_cpu_lanes, lane_count, use_threads
from service.http.uploads import decode_image
from tests.helpers import load_models, png_bytes, random_image, running_app, settings_for, tiny_vit_config

pytestmark = pytest.mark.anyio

CPU = torch.device("cpu")


def test_a_call_gets_the_threads_divided_by_the_busy_lanes_and_knows_its_lane(lanes) -> None:
    started, finish = threading.Event(), threading.Event()

    def first() -> tuple[int, int]:
        started.set()
        finish.wait(10)
        return copy_in_use(), torch.get_num_threads()

    running = lanes.executor(0).submit(first)
    assert started.wait(10)
    second = lanes.executor(1).submit(lambda: (copy_in_use(), torch.get_num_threads())).result(10)
    finish.set()
    assert running.result(10) == (0, 2)  # alone when it started
    assert second == (1, 1)  # two lanes busy: 2 threads // 2
    assert lanes.executor(1).submit(lambda: torch.get_num_threads()).result(10) == 2  # alone again
    assert copy_in_use() == 0  # off the lanes


async def test_the_lane_freed_last_is_handed_out_first_and_a_third_caller_waits(lanes) -> None:
    first = await lanes.acquire()
    lanes.release(first)
    assert await lanes.acquire() == first == 0
    second = await lanes.acquire()
    waiting = asyncio.ensure_future(lanes.acquire())
    await asyncio.sleep(0.05)
    assert second == 1 and not waiting.done()
    lanes.release(second)
    assert await asyncio.wait_for(waiting, 5) == 1


async def test_a_queue_runs_two_batches_at_once_on_two_lanes(lanes) -> None:
    # Each batch waits for another one to be running: with a single lane this would time out.
    two_running = threading.Barrier(2, timeout=10)

    def process(items):
        two_running.wait()
        return [(item, copy_in_use()) for item in items]

    queue = BatchQueue("two", process, lanes, max_batch_size=1, max_wait_ms=0.0, queue_size=8, timeout_s=20.0)
    queue.start()
    results = await asyncio.gather(queue.submit("a"), queue.submit("b"))
    await queue.close()
    assert [r.value[0] for r in results] == ["a", "b"]
    assert sorted(r.value[1] for r in results) == [0, 1]


def test_lane_copies_share_the_weights_but_not_hooks_or_switches() -> None:
    served = load_models(settings_for(tiny_vit_config()))["tiny_vit"]
    served.make_copies(2)
    original, lane_copy = served.copies
    assert original is served.network and lane_copy is not original
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(original.parameters(), lane_copy.parameters()))
    calls: list[str] = []
    lane_copy.register_forward_hook(lambda *_: calls.append("lane_copy"))
    lane_copy.blocks[0].attn.fused_attn = not original.blocks[0].attn.fused_attn
    with torch.inference_mode():
        original(torch.zeros(1, 3, 32, 32))
    assert calls == []
    pool = DeviceLanes(CPU, 2)
    try:
        modules = [pool.executor(i).submit(lambda: served.active_network).result(10) for i in range(2)]
    finally:
        pool.shutdown()
    assert modules[0] is original and modules[1] is lane_copy
    assert served.active_network is original  # off the lanes


async def test_an_explanation_and_a_prediction_running_at_once_do_not_mix() -> None:
    """raw_attention hooks and switches its lane's copy's attention while a prediction runs the other copy."""
    settings = settings_for(tiny_vit_config(max_batch_size=1, max_wait_ms=0.0), cpu_workers=2)
    models = load_models(settings)
    served = models["tiny_vit"]
    predict_image, explain_image = png_bytes(random_image(21)), png_bytes(random_image(22))
    async with running_app(settings, models) as (client, _):
        explain_fields = {"methods": json.dumps(["raw_attention"]), "output": json.dumps({"format": ["raw"]})}
        solo = (await client.post("/v1/models/tiny_vit/explain", files={"file": ("x.png", explain_image)},
                                  data=explain_fields)).json()
        both_lanes = threading.Barrier(2, timeout=20)

        def wait_for_the_other_lane(*_: object) -> None:
            both_lanes.wait()

        handles = [lane_copy.register_forward_pre_hook(wait_for_the_other_lane) for lane_copy in served.copies]
        try:
            predicted, explained = await asyncio.gather(
                client.post("/v1/models/tiny_vit/predict", files={"file": ("x.png", predict_image)},
                            data={"top_k": "10"}),
                client.post("/v1/models/tiny_vit/explain", files={"file": ("x.png", explain_image)},
                            data=explain_fields),
            )
        finally:
            for handle in handles:
                handle.remove()
    assert predicted.status_code == 200 and explained.status_code == 200, (predicted.text, explained.text)
    pixels = served.preprocess(decode_image(predict_image, settings.max_image_pixels)).unsqueeze(0)
    with torch.inference_mode():
        expected = served.network(pixels).softmax(-1)[0]
    got = torch.zeros(10)
    for p in predicted.json()["predictions"]:
        got[p["index"]] = p["probability"]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)

    def raw(body: dict) -> np.ndarray:
        rendered = body["explanations"][0]["results"][0]["map"]["raw"]
        return np.frombuffer(base64.b64decode(rendered["data"]), dtype="<f4")

    np.testing.assert_allclose(raw(explained.json()), raw(solo), atol=1e-6)


def test_a_model_that_cannot_be_copied_names_itself_and_the_setting() -> None:
    served = load_models(settings_for(tiny_vit_config()))["tiny_vit"]
    served.network.lock = threading.Lock()  # deepcopy cannot copy a lock
    with pytest.raises(RuntimeError, match=r"'tiny_vit' cannot be copied for 2 CPU lanes .*cpu_workers = 1"):
        served.make_copies(2)
    served.make_copies(1)  # one lane needs no copy
    assert served.copies == [served.network]


async def test_with_two_lanes_a_batch_takes_at_most_half_the_cap(lanes) -> None:
    sizes: list[int] = []
    gate = threading.Event()

    def process(items):
        gate.wait(10)
        sizes.append(len(items))
        return list(items)

    queue = BatchQueue("halves", process, lanes, max_batch_size=5, max_wait_ms=10_000.0, queue_size=16,
                       timeout_s=20.0)
    assert queue.batch_cap == 3
    queue.start()
    pending = [asyncio.ensure_future(queue.submit(i)) for i in range(6)]
    await asyncio.sleep(0.1)
    gate.set()
    results = await asyncio.gather(*pending)
    await queue.close()
    assert [r.value for r in results] == list(range(6))
    assert sorted(sizes) == [3, 3]


async def test_warm_up_runs_batch_1_and_the_lane_batch_cap_on_each_lane() -> None:
    settings = settings_for(tiny_vit_config(max_batch_size=8), cpu_workers=2)
    served = load_models(settings)["tiny_vit"]
    sizes: list[tuple[int, int]] = []
    served.network.register_forward_pre_hook(lambda _module, args: sizes.append((copy_in_use(), args[0].shape[0])))
    async with running_app(settings, {"tiny_vit": served}):
        assert sorted(sizes) == [(0, 1), (0, 4), (1, 1), (1, 4)] and served.ready


def test_a_cpu_gets_cpu_workers_lanes_and_a_gpu_one() -> None:
    assert lane_count(CPU, 3) == 3 and lane_count(CPU, None) == default_cpu_lanes()
    assert lane_count(torch.device("cuda:0"), 3) == 1


def test_a_threads_own_count_survives_another_thread_setting_a_different_one() -> None:
    """torch initialises a thread's count from the process-wide one on its first parallel operation; a count set
    before that would be overwritten by whatever another thread set last."""
    first_set, second_set = threading.Event(), threading.Event()
    seen: list[int] = []

    def first() -> None:
        use_threads(1)
        first_set.set()
        second_set.wait(10)
        seen.append(torch.get_num_threads())

    def second() -> None:
        first_set.wait(10)
        use_threads(2)
        second_set.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == [1]


class LongWork:
    """A processor running each batch as `chunks` chunks with a checkpoint before each; records every chunk under
    its batch's first item."""

    def __init__(self, chunks: int, events: list[str]) -> None:
        self.chunks, self.events = chunks, events
        self.started = threading.Event()

    def __call__(self, items):
        batch = current_batch(len(items))
        for chunk in range(self.chunks):
            batch.checkpoint()
            self.events.append(f"{items[0]} chunk {chunk}")
            self.started.set()
            threading.Event().wait(0.002)
        return list(items)


def make_lane_queue(name: str, process, lanes: DeviceLanes) -> BatchQueue:
    queue = BatchQueue(name, process, lanes, max_batch_size=1, max_wait_ms=0.0, queue_size=8, timeout_s=60.0)
    queue.start()
    return queue


async def test_a_long_batch_lends_its_only_lane_to_another_queue_between_chunks() -> None:
    """Model A's long batch holds the single lane (a GPU, or cpu_workers = 1); model B's short batch runs at A's
    next chunk boundary, on that lane's thread with its own copy, and A then goes on."""
    lanes = DeviceLanes(CPU, 1, threads=1)
    events: list[str] = []
    long_work = LongWork(200, events)

    def short(items):
        events.append(f"{items[0]} on copy {copy_in_use()}")
        return list(items)

    a, b = make_lane_queue("a", long_work, lanes), make_lane_queue("b", short, lanes)
    try:
        explaining = asyncio.ensure_future(a.submit("A"))
        assert await asyncio.to_thread(long_work.started.wait, 10)
        assert (await b.submit("B")).value == "B"
        assert not explaining.done()  # B was answered while A still ran
        assert (await explaining).value == "A"
    finally:
        await a.close()
        await b.close()
        lanes.shutdown()
    lent_at = events.index("B on copy 0")
    assert 0 < lent_at < len(events) - 1 and events[-1] == "A chunk 199"


async def test_a_long_batch_does_not_lend_its_lane_to_its_own_queue() -> None:
    """A batch of the same model would run the copy the long batch is using (its hooks, its attention switch)."""
    lanes = DeviceLanes(CPU, 1, threads=1)
    events: list[str] = []
    long_work = LongWork(30, events)
    a = make_lane_queue("a", long_work, lanes)
    try:
        first = asyncio.ensure_future(a.submit("first"))
        assert await asyncio.to_thread(long_work.started.wait, 10)
        second = asyncio.ensure_future(a.submit("second"))
        assert [r.value for r in await asyncio.gather(first, second)] == ["first", "second"]
    finally:
        await a.close()
        lanes.shutdown()
    assert events == [f"first chunk {i}" for i in range(30)] + [f"second chunk {i}" for i in range(30)]


async def test_a_borrowed_lane_is_not_lent_again() -> None:
    lanes = DeviceLanes(CPU, 1, threads=1)
    events: list[str] = []
    long_a, long_b = LongWork(100, events), LongWork(20, events)
    a, b = make_lane_queue("a", long_a, lanes), make_lane_queue("b", long_b, lanes)
    try:
        first = asyncio.ensure_future(a.submit("A1"))
        assert await asyncio.to_thread(long_a.started.wait, 10)
        borrowed = asyncio.ensure_future(b.submit("B"))
        assert await asyncio.to_thread(long_b.started.wait, 10)
        again = asyncio.ensure_future(a.submit("A2"))  # A waits again while B runs on A1's lent lane
        assert [r.value for r in await asyncio.gather(first, borrowed, again)] == ["A1", "B", "A2"]
    finally:
        await a.close()
        await b.close()
        lanes.shutdown()
    runs = [e.split()[0] for e in events]
    b_chunks = [i for i, run in enumerate(runs) if run == "B"]
    assert b_chunks == list(range(b_chunks[0], b_chunks[0] + 20))  # B's chunks in one run: nothing nested in B
    assert runs.index("A2") > max(i for i, run in enumerate(runs) if run == "A1")  # A2 never nested in A1


async def test_a_batch_run_on_a_lent_lane_gets_the_lanes_own_autograd_modes() -> None:
    """The lender may pause inside inference mode (a chunk loop); the borrower may need gradients."""
    lanes = DeviceLanes(CPU, 1, threads=1)
    paused = threading.Event()
    modes: list[tuple[bool, bool]] = []

    def lender(items):
        with torch.inference_mode():
            paused.set()
            for _ in range(2000):
                current_batch(len(items)).checkpoint()
                if modes:  # the borrower ran at that checkpoint, inside this inference-mode block
                    return ["lent"]
                threading.Event().wait(0.002)
        return list(items)

    def borrower(items):
        modes.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        return list(items)

    a, b = make_lane_queue("a", lender, lanes), make_lane_queue("b", borrower, lanes)
    try:
        lending = asyncio.ensure_future(a.submit("A"))
        assert await asyncio.to_thread(paused.wait, 10)
        assert (await b.submit("B")).value == "B"
        assert (await lending).value == "lent"
    finally:
        await a.close()
        await b.close()
        lanes.shutdown()
    assert modes == [(True, False)]
