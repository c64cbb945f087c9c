"""The work a model's batch queue runs: payload types and the batch processor that serves them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from service.served_model import ServedModel


@dataclass(frozen=True)
class PredictJob:
    """One preprocessed image to classify."""

    pixels: torch.Tensor  # (C, H, W) float32, normalised


def make_batch_processor(served: ServedModel):
    """A function running one batch of jobs for `served` on its device (called on the device worker thread)."""

    def process(jobs: Sequence[PredictJob]) -> list[torch.Tensor]:
        pixels = torch.stack([job.pixels for job in jobs])
        probabilities = served.predict_probabilities(pixels)
        return list(probabilities.unbind(0))

    return process
