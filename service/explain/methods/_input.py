"""Shared by the input-gradient and perturbation methods: channel reductions, seeded noise, and splitting the
samples (noise samples, integration steps, masks) of all images of a batch into model passes of bounded size."""

from __future__ import annotations

from typing import Iterator, Literal, Sequence

import torch

MagnitudeReduce = Literal["max", "mean", "l2"]
AttributionReduce = Literal["sum", "abs_sum", "l2"]

MAGNITUDE_REDUCE_DESCRIPTION = (
    "How the absolute values of the 3 channels become one value per pixel: `max`, `mean` or `l2` (Euclidean norm)."
)
ATTRIBUTION_REDUCE_DESCRIPTION = (
    "How the per-channel attributions become one value per pixel: `sum` (signed; the map then sums to the total "
    "attribution), `abs_sum` (sum of absolute values) or `l2` (Euclidean norm over channels)."
)
INPUT_GRADIENT_COST_NOTE = (
    "Shares the batch's forward pass and one backward pass per target (down to the pixels) with the other gradient "
    "methods."
)
INPUT_RESOLUTION_NOTE = (
    " The map has the model's input resolution (one value per input pixel), so in `tokens` space it is returned at "
    "that resolution too."
)


def reduce_magnitude(values: torch.Tensor, how: MagnitudeReduce) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W): max, mean or Euclidean norm of the absolute values over channels."""
    magnitude = values.abs()
    if how == "max":
        return magnitude.amax(dim=1)
    if how == "mean":
        return magnitude.mean(dim=1)
    return magnitude.pow(2).sum(dim=1).sqrt()


def reduce_attribution(values: torch.Tensor, how: AttributionReduce) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W): signed sum, sum of absolute values or Euclidean norm over channels."""
    if how == "sum":
        return values.sum(dim=1)
    if how == "abs_sum":
        return values.abs().sum(dim=1)
    return values.pow(2).sum(dim=1).sqrt()


def seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator seeded with `seed` on `device`: the same seed gives the same noise on the same kind of device."""
    return torch.Generator(device=device).manual_seed(seed)


def chunk_segments(counts: Sequence[int], chunk_size: int) -> Iterator[list[tuple[int, int, int]]]:
    """Split image i's counts[i] items (all images one after the other) into chunks of at most chunk_size items.

    Yields, per chunk, its (image, first item, stop item) segments in order, so every image's items are visited
    in ascending order (sequential noise draws stay reproducible whatever the chunk size and the batch).
    """
    segments: list[tuple[int, int, int]] = []
    room = chunk_size
    for image, count in enumerate(counts):
        first = 0
        while first < count:
            take = min(room, count - first)
            segments.append((image, first, first + take))
            first += take
            room -= take
            if room == 0:
                yield segments
                segments, room = [], chunk_size
    if segments:
        yield segments


def normal_noise(generator: torch.Generator, count: int, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """`count` standard-normal tensors of `shape`, drawn one at a time (so the values do not depend on how many
    are drawn together), stacked: (count, *shape)."""
    if count == 0:
        return torch.empty((0, *shape), device=device)
    return torch.stack([torch.randn(shape, generator=generator, device=device) for _ in range(count)])
