"""The work a model's batch queue runs: a batch of work items of several kinds, each kind run by its own handler.

The runtime knows predictions; other kinds (explanations) bring their handler when the queue is built, so the
runtime never imports what runs on it. Each handler is given the running batch seen as its own items
(`RunningBatch`: which are still wanted, and `checkpoint()` to call between chunks of long work).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch

from service.model.served import ServedModel
from service.runtime.batching import BatchCancelledError, RunningBatch, current_batch, work_kind
from service.runtime.devices import steady_threads

# Runs the items of one kind of a batch (on one of the device's lanes) and returns one result per item, in order.
BatchHandler = Callable[[ServedModel, Sequence[Any], RunningBatch], Sequence[Any]]


@dataclass(frozen=True)
class PredictJob:
    """One preprocessed image to classify."""

    kind: ClassVar[str] = "predict"
    pixels: torch.Tensor  # (C, H, W) float32, normalised


def predict_batch(served: ServedModel, jobs: Sequence[PredictJob], batch: RunningBatch | None = None,
                  ) -> list[torch.Tensor]:
    """Softmax probabilities (classes,) per image, from one inference-mode forward pass over the whole batch (one
    short pass: nothing to stop early)."""
    return list(served.predict_probabilities(torch.stack([job.pixels for job in jobs])).unbind(0))


def make_batch_processor(served: ServedModel, handlers: Mapping[type, BatchHandler]):
    """A function running one batch for `served`: the items of each kind share one call of that kind's handler
    (handlers run in the mapping's order), and the results come back in the batch's order. A kind whose items are
    all abandoned is skipped (each gets the cancellation, which nobody receives). Every kind but predictions runs
    with its lane's fixed share of the threads (`steady_threads`): an explanation's maps do not depend on the load."""

    def process(items: Sequence[Any]) -> list[Any]:
        unknown = {type(item) for item in items} - set(handlers)
        if unknown:
            raise TypeError(f"no batch handler for {sorted(kind.__name__ for kind in unknown)}")
        batch = current_batch(len(items))
        results: list[Any] = [None] * len(items)
        for kind, handler in handlers.items():
            indices = [i for i, item in enumerate(items) if type(item) is kind]
            if not indices:
                continue
            part = batch.subset(indices)
            started = time.perf_counter()
            try:
                part.checkpoint()
                if kind is not PredictJob:
                    steady_threads()
                outcomes = handler(served, [items[i] for i in indices], part)
            except BatchCancelledError as cancelled:
                if not batch.any_wanted():
                    raise
                outcomes = [cancelled] * len(indices)
            finally:
                batch.add_kind_seconds(work_kind(items[indices[0]]), time.perf_counter() - started)
            for i, result in zip(indices, outcomes, strict=True):
                results[i] = result
        return results

    return process
