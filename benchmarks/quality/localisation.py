"""Localisation of a saliency map against a ground-truth object mask, in the model's input space.

A map on its own grid (patches, feature-map cells or pixels) is brought to the input resolution by bilinear
upsampling, exactly as the server's `space="input"` output does (service/explain/render/maps.py `project_map`), and
compared with the object's pixel mask at that resolution. The scores read the map as the server draws it with
`output.sign = "positive"`: negatives clipped to 0, then scaled from max(min, 0) to max, so 0..1 (`rendered`). An
unsigned map is thus min-max normalised (a constant offset, such as CAM's or ViT-CX's, carries no localisation), and
a signed map (input x gradient, integrated gradients with a signed reduction) keeps its positive evidence only.

- `pointing_game` (Zhang et al. 2016): a hit when a maximum of the map lies inside the mask, or within `tolerance`
  pixels of it; as in quantus.PointingGame, ties count as a hit when any of the maximal pixels qualifies. The
  report's tolerance is Zhang et al.'s 15 px at 224 px scaled to the input side (4 px at 64 px).
- `mass_inside` (relevance mass accuracy, Arras et al. 2022, quantus.RelevanceMassAccuracy): the share of the
  rendered map's total inside the mask.
- `best_iou`: the best intersection-over-union of the region {rendered >= t} with the mask over the thresholds
  t = 0.05, 0.10, ..., 0.95.
A map with no positive variation (constant, or nowhere positive) gets no hit, no mass and no overlap (all 0).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_dilation

from service.explain.render.maps import SIGNED_RTOL

IOU_THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))
POINTING_TOLERANCE_AT_224 = 15.0  # px, Zhang et al. 2016 ("Top-down neural attention by excitation backprop")


def to_input_space(saliency: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A (h, w) map upsampled bilinearly to the input's (height, width), as `project_map(..., "input", ...)` does."""
    grid = saliency.detach().to(device="cpu", dtype=torch.float32)
    values = F.interpolate(grid[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return values.double().numpy()


def is_signed(saliency: torch.Tensor | np.ndarray) -> bool:
    """Whether the server's `sign = "auto"` draws the map signed: its minimum is below -SIGNED_RTOL x max |map|."""
    values = saliency.detach().cpu().double().numpy() if isinstance(saliency, torch.Tensor) else np.asarray(saliency)
    magnitude = float(np.abs(values).max()) if values.size else 0.0
    return magnitude > 0 and float(values.min()) < -SIGNED_RTOL * magnitude


def rendered(values: np.ndarray) -> np.ndarray | None:
    """The map as `sign = "positive"` draws it, in 0..1: negatives clipped, scaled from max(min, 0) to max. None for a
    map without positive variation."""
    clipped = np.clip(np.asarray(values, dtype=np.float64), 0.0, None)
    low, high = max(float(np.min(values)), 0.0), float(clipped.max())
    if not high > low or not math.isfinite(high):
        return None
    return (clipped - low) / (high - low)


def pointing_tolerance(side: int) -> int:
    """The pointing game's tolerance at an input of this side: 15 px at 224 px, scaled."""
    return round(POINTING_TOLERANCE_AT_224 * side / 224.0)


def _disk(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return x * x + y * y <= radius * radius


def pointing_game(values: np.ndarray, mask: np.ndarray, tolerance: int = 0) -> bool:
    """Whether a maximum of the map (input space) lies inside the mask or within `tolerance` px of it."""
    values = np.asarray(values, dtype=np.float64)
    if rendered(values) is None:
        return False
    target = mask.astype(bool)
    if tolerance > 0:
        target = binary_dilation(target, structure=_disk(tolerance))
    return bool(np.any(target & (values == values.max())))


def mass_inside(values: np.ndarray, mask: np.ndarray) -> float:
    """The share of the rendered map's mass inside the mask (0 when the map has none)."""
    shown = rendered(values)
    if shown is None:
        return 0.0
    return float(shown[mask.astype(bool)].sum() / shown.sum())


def best_iou(values: np.ndarray, mask: np.ndarray) -> tuple[float, float | None]:
    """(the best IoU of {rendered >= t} with the mask over IOU_THRESHOLDS, the threshold reaching it)."""
    shown = rendered(values)
    if shown is None:
        return 0.0, None
    target = mask.astype(bool)
    best, at = 0.0, None
    for t in IOU_THRESHOLDS:
        region = shown >= t
        union = np.count_nonzero(region | target)
        iou = np.count_nonzero(region & target) / union if union else 0.0
        if iou > best:
            best, at = iou, t
    return float(best), at


def localisation_scores(saliency: torch.Tensor, mask: np.ndarray, tolerance: int) -> dict[str, float | None]:
    """Every localisation score of one map (its own grid) against one input-space mask."""
    values = to_input_space(saliency, mask.shape)
    iou, threshold = best_iou(values, mask)
    return {
        "pointing_game": float(pointing_game(values, mask, tolerance)),
        "mass_inside": mass_inside(values, mask),
        "best_iou": iou,
        "best_iou_threshold": threshold,
    }
