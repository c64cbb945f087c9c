"""Baseline maps that know nothing about the image or the model, on the same grid as the map they are compared with:
a method is only worth its cost where it beats them.

- `random_map`: independent uniform values per cell, seeded per (seed, image, grid), so every method with the same
  grid is compared with the same random map on an image and reruns are identical.
- `gaussian_map`: a centred Gaussian, sigma a quarter of the grid's side per axis (in cells): the photographer's
  centre bias, which alone does well on photos whose object is in the middle.
"""

from __future__ import annotations

import numpy as np
import torch

BASELINES = ("random", "gaussian")


def random_map(shape: tuple[int, int], seed: int, image: int = 0) -> torch.Tensor:
    """(h, w) float32 values uniform in [0, 1), a pure function of (seed, image, shape)."""
    rows, cols = shape
    rng = np.random.default_rng([seed, image, rows, cols])
    return torch.from_numpy(rng.random((rows, cols)).astype(np.float32))


def gaussian_map(shape: tuple[int, int]) -> torch.Tensor:
    """(h, w) float32: exp(-d^2 / 2) with d the distance of each cell centre from the grid's centre in units of
    sigma = side / 4 per axis; 1 at the centre."""
    rows, cols = shape
    y = (torch.arange(rows, dtype=torch.float64) + 0.5 - rows / 2) / (rows / 4)
    x = (torch.arange(cols, dtype=torch.float64) + 0.5 - cols / 2) / (cols / 4)
    return torch.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / 2).float()


def baseline_map(name: str, shape: tuple[int, int], seed: int, image: int) -> torch.Tensor:
    if name == "random":
        return random_map(shape, seed, image)
    if name == "gaussian":
        return gaussian_map(shape)
    raise ValueError(f"unknown baseline {name!r}; known: {BASELINES}")
