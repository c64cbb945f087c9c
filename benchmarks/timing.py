"""Repeating a timed call until a time budget is spent, and robust summaries of the durations."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - started


def interleaved(
    fns: Sequence[Callable[[], object]], device: torch.device, budget_s: float, min_repeats: int = 2,
    max_repeats: int = 50, warmup: int = 1,
) -> list[list[float]]:
    """Durations (s) of each function, called in turn (a, b, a, b, ...) so slow drifts of the machine affect all
    alike, until `budget_s` is spent (at least `min_repeats` rounds, at most `max_repeats`)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    durations: list[list[float]] = [[] for _ in fns]
    started = time.perf_counter()
    while True:
        for fn, out in zip(fns, durations):
            out.append(time_once(fn, device))
        rounds = len(durations[0])
        if rounds >= max_repeats or (rounds >= min_repeats and time.perf_counter() - started >= budget_s):
            return durations


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> float:
    """Relative half-range of the middle half (interquartile range / 2 / median): how noisy the figure is."""
    if len(values) < 4:
        return (max(values) - min(values)) / 2 / median(values) if len(values) > 1 and median(values) > 0 else 0.0
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / 2 / median(values) if median(values) > 0 else 0.0
