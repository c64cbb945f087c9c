"""An explanation's maps do not depend on the load: on a CPU lane, explanations run with the lane's fixed share of
the threads (`steady_threads`), not the split between the busy lanes that predictions get, because the order of a
multi-threaded reduction (and so the last bits of a gradient) changes with the thread count."""

from __future__ import annotations

import threading

import torch

from service.explain.pipeline import ExplainJob, run_explain_batch
from service.explain.requests import resolve_methods
from service.explain.targets import TargetRequest
from service.runtime.devices import DeviceLanes, steady_threads
from service.runtime.processor import PredictJob, make_batch_processor, predict_batch
from tests.explain_helpers import random_pixels, served_model

CPU = torch.device("cpu")


def _while_other_lane_busy(lanes: DeviceLanes, fn):
    """`fn()` on lane 0 while lane 1 runs a call (both busy: the usual split would give each one thread)."""
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(30)

    held = lanes.executor(1).submit(hold)
    assert started.wait(10)
    try:
        return lanes.executor(0).submit(fn).result(60)
    finally:
        release.set()
        held.result(10)


def test_steady_threads_gives_a_lane_its_fixed_share_whatever_the_load(lanes) -> None:
    def threads() -> int:
        steady_threads()
        return torch.get_num_threads()

    assert lanes.executor(0).submit(threads).result(10) == 1  # alone: 2 threads // 2 lanes, not both threads
    assert _while_other_lane_busy(lanes, threads) == 1
    assert lanes.executor(0).submit(torch.get_num_threads).result(10) == 2  # a prediction alone still gets both


def test_steady_threads_does_nothing_outside_a_lane() -> None:
    before = torch.get_num_threads()
    steady_threads()
    assert torch.get_num_threads() == before


def test_an_explanations_maps_are_identical_whether_its_lane_had_the_threads_alone_or_shared(lanes) -> None:
    # efficientnet_lite0's maps differ with 1 and 2 threads (measured at 224 px: up to 1.5e-2 of a min-max
    # normalised map; a few 1e-7 here at 32 px), so exact equality fails without the fixed share.
    served = served_model("efficientnet_lite0", {"num_classes": 10}, size=32)
    requests = resolve_methods(["saliency", "input_x_gradient"], served.family, served.anatomy)
    jobs = [ExplainJob(pixels, requests, TargetRequest(top_k=1)) for pixels in random_pixels(served, 2)]
    process = make_batch_processor(served, {PredictJob: predict_batch, ExplainJob: run_explain_batch})

    alone = lanes.executor(0).submit(process, jobs).result(60)
    shared = _while_other_lane_busy(lanes, lambda: process(jobs))
    for first, second in zip(alone, shared, strict=True):
        for a, b in zip(first.methods, second.methods, strict=True):
            for map_a, map_b in zip(a.maps, b.maps, strict=True):
                assert torch.equal(map_a, map_b)
