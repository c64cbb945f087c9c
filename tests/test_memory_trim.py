"""After a long batch leaves every lane idle, the lane gives the freed heap back to the system (glibc's
`malloc_trim`, service/runtime/memory.py), behind the batch's result; without glibc nothing happens."""

from __future__ import annotations

import threading

import pytest
import torch

from service.runtime import memory
from service.runtime.devices import DeviceLanes

CPU = torch.device("cpu")


@pytest.fixture
def trims(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(memory, "can_trim", lambda: True)
    monkeypatch.setattr(memory, "trim_memory", lambda: calls.append(threading.current_thread().name) or True)
    return calls


def _drain(lanes: DeviceLanes) -> None:
    for executor in lanes.executors:  # a trim is queued behind the call on its lane: a later call runs after it
        executor.submit(lambda: None).result(10)


def test_a_long_call_that_leaves_the_lanes_idle_is_followed_by_a_trim_on_its_lane(lanes, trims) -> None:
    lanes.trim_after_s = 0.0
    name = lanes.executor(1).submit(lambda: threading.current_thread().name).result(10)
    _drain(lanes)
    assert name in trims  # (with the drain's own calls, each long enough at 0 s)


def test_short_calls_and_calls_ending_while_another_lane_is_busy_do_not_trim(lanes, trims) -> None:
    lanes.executor(0).submit(lambda: None).result(10)  # shorter than trim_after_s
    started, release = threading.Event(), threading.Event()
    held = lanes.executor(1).submit(lambda: (started.set(), release.wait(30)))
    assert started.wait(10)
    lanes.trim_after_s = 0.0
    lanes.executor(0).submit(lambda: None).result(10)  # long enough, but lane 1 is still busy
    lanes.executor(0).submit(lambda: None).result(10)
    assert trims == []
    release.set()
    held.result(10)


def test_without_glibc_nothing_is_trimmed_and_the_lanes_work(lanes, monkeypatch) -> None:
    monkeypatch.setattr(memory, "_MALLOC_TRIM", None)
    assert not memory.can_trim()
    assert memory.trim_memory() is False
    lanes.trim_after_s = 0.0
    assert lanes.executor(0).submit(lambda: 42).result(10) == 42
    _drain(lanes)


def test_a_failing_trim_is_not_an_error(monkeypatch) -> None:
    def broken(_pad: int) -> int:
        raise OSError("no")

    monkeypatch.setattr(memory, "_MALLOC_TRIM", broken)
    assert memory.trim_memory() is False


def test_the_real_trim_runs_where_the_platform_has_it() -> None:
    assert memory.trim_memory() is memory.can_trim()
