"""The work a model's batch queue runs: payload types and the batch processor that serves them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from service.explain.pipeline import ExplainJob, ExplainOutcome, run_explain_batch
from service.served_model import ServedModel


@dataclass(frozen=True)
class PredictJob:
    """One preprocessed image to classify."""

    pixels: torch.Tensor  # (C, H, W) float32, normalised


Job = PredictJob | ExplainJob


def make_batch_processor(served: ServedModel):
    """A function running one batch of jobs for `served` on its device (called on one of the device's lanes).

    Predictions share one inference-mode forward pass; explanations share one recording forward pass.
    """

    def process(jobs: Sequence[Job]) -> list[torch.Tensor | ExplainOutcome]:
        results: list[torch.Tensor | ExplainOutcome | None] = [None] * len(jobs)
        predict = [i for i, job in enumerate(jobs) if isinstance(job, PredictJob)]
        explain = [i for i, job in enumerate(jobs) if isinstance(job, ExplainJob)]
        if predict:
            probabilities = served.predict_probabilities(torch.stack([jobs[i].pixels for i in predict]))
            for i, row in zip(predict, probabilities.unbind(0)):
                results[i] = row
        if explain:
            outcomes = run_explain_batch(served, [jobs[i] for i in explain])  # type: ignore[misc]
            for i, outcome in zip(explain, outcomes):
                results[i] = outcome
        return results  # type: ignore[return-value]

    return process
