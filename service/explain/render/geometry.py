"""Where the model's input crop lies in the original image, traced through timm's eval transform.

Coordinates are continuous with pixel edges at integers (pixel (i, j) covers [j, j+1) x [i, i+1)), the convention
under which PIL's and torchvision's resizing is an exact scaling: resized = original * scale. Cropping and padding
shift the origin: input = resized - offset (a negative offset means padding on the left / top).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from timm.data.transforms import (
    CenterCropOrPad,
    MaybePILToTensor,
    MaybeToTensor,
    ResizeKeepRatio,
    ToNumpy,
    TrimBorder,
)
from timm.data.transforms import ToTensor as TimmToTensor
from torchvision import transforms as T

# Transforms that change pixel values or the container type but never where a pixel lies.
_NEUTRAL = (
    T.ToTensor, T.PILToTensor, T.ConvertImageDtype, T.Normalize,
    TimmToTensor, MaybeToTensor, MaybePILToTensor, ToNumpy, torch.nn.Identity,
)


class UnsupportedTransformError(ValueError):
    """The transform pipeline holds a step whose geometry cannot be traced."""


@dataclass(frozen=True)
class CropGeometry:
    """The affine map, per axis, from original pixel coordinates to model-input pixel coordinates."""

    original_size: tuple[int, int]  # (width, height)
    input_size: tuple[int, int]  # (width, height) of the model input
    scale: tuple[float, float]  # resized / original per axis (x, y)
    offset: tuple[float, float]  # crop's left / top in resized coordinates

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of the input crop in original pixel coordinates (may exceed the image)."""
        left, top = self.input_to_original(0.0, 0.0)
        right, bottom = self.input_to_original(float(self.input_size[0]), float(self.input_size[1]))
        return left, top, right, bottom

    def input_to_original(self, u: float, v: float) -> tuple[float, float]:
        """Map a point from input pixel coordinates to original pixel coordinates."""
        return (u + self.offset[0]) / self.scale[0], (v + self.offset[1]) / self.scale[1]

    def original_to_input(self, x: float, y: float) -> tuple[float, float]:
        """Map a point from original pixel coordinates to input pixel coordinates."""
        return x * self.scale[0] - self.offset[0], y * self.scale[1] - self.offset[1]


@dataclass
class _Tracker:
    size: tuple[int, int]  # current (width, height)
    scale: tuple[float, float]
    offset: tuple[float, float]

    def resize(self, width: int, height: int) -> None:
        fx, fy = width / self.size[0], height / self.size[1]
        self.scale = (self.scale[0] * fx, self.scale[1] * fy)
        self.offset = (self.offset[0] * fx, self.offset[1] * fy)
        self.size = (width, height)

    def crop(self, left: int, top: int, width: int, height: int) -> None:
        """Crop at (left, top) in current coordinates; negative values pad."""
        self.offset = (self.offset[0] + left, self.offset[1] + top)
        self.size = (width, height)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) from an int or a 1- or 2-sequence, as torchvision's `_setup_size` reads it."""
    if isinstance(size, int):
        return size, size
    if len(size) == 1:
        return int(size[0]), int(size[0])
    return int(size[0]), int(size[1])


def _resized_size(width: int, height: int, size: int | Sequence[int], max_size: int | None) -> tuple[int, int]:
    """(width, height) after torchvision's `Resize(size, max_size=max_size)`."""
    if not isinstance(size, int) and len(size) == 2:
        return int(size[1]), int(size[0])
    requested = size if isinstance(size, int) else int(size[0])
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = requested, int(requested * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _center_crop_or_pad(tracker: _Tracker, size: int | Sequence[int]) -> None:
    """torchvision's `center_crop` (timm's `center_crop_or_pad` computes the same): pad if too small, then crop."""
    crop_h, crop_w = _pair(size)
    width, height = tracker.size
    pad_left = (crop_w - width) // 2 if crop_w > width else 0
    pad_top = (crop_h - height) // 2 if crop_h > height else 0
    padded_w = width + (pad_left + (crop_w - width + 1) // 2 if crop_w > width else 0)
    padded_h = height + (pad_top + (crop_h - height + 1) // 2 if crop_h > height else 0)
    if (padded_w, padded_h) == (crop_w, crop_h):
        left = top = 0
    else:
        top = int(round((padded_h - crop_h) / 2.0))
        left = int(round((padded_w - crop_w) / 2.0))
    tracker.crop(left - pad_left, top - pad_top, crop_w, crop_h)


def _keep_ratio_size(width: int, height: int, step: ResizeKeepRatio) -> tuple[int, int]:
    """(width, height) after timm's `ResizeKeepRatio` with its random scale / aspect options off."""
    if step.random_scale_prob > 0 or step.random_aspect_prob > 0:
        raise UnsupportedTransformError(f"random geometry in {step!r} cannot be traced")
    target_h, target_w = step.size
    ratio_h, ratio_w = height / target_h, width / target_w
    ratio = max(ratio_h, ratio_w) * step.longest + min(ratio_h, ratio_w) * (1.0 - step.longest)
    return round(width / ratio), round(height / ratio)


def _steps(transform: Any) -> list[Any]:
    if isinstance(transform, T.Compose):
        return [s for t in transform.transforms for s in _steps(t)]
    if isinstance(transform, (list, tuple)):
        return [s for t in transform for s in _steps(t)]
    return [transform]


def crop_geometry(transform: Any, original_size: tuple[int, int]) -> CropGeometry:
    """Trace the geometry of an eval transform (a torchvision `Compose` or a list of steps) for an image size.

    Raises `UnsupportedTransformError` for any step that is neither a known resize / crop nor geometry-neutral.
    """
    tracker = _Tracker(size=(int(original_size[0]), int(original_size[1])), scale=(1.0, 1.0), offset=(0.0, 0.0))
    for step in _steps(transform):
        width, height = tracker.size
        if isinstance(step, _NEUTRAL):
            continue
        if isinstance(step, T.Resize):
            tracker.resize(*_resized_size(width, height, step.size, step.max_size))
        elif isinstance(step, ResizeKeepRatio):
            tracker.resize(*_keep_ratio_size(width, height, step))
        elif isinstance(step, (T.CenterCrop, CenterCropOrPad)):
            _center_crop_or_pad(tracker, step.size)
        elif isinstance(step, TrimBorder):
            border = step.border_size
            # timm clamps both the top and the left to the height.
            tracker.crop(min(border, height), min(border, height), max(0, width - 2 * border),
                         max(0, height - 2 * border))
        else:
            raise UnsupportedTransformError(
                f"cannot trace the geometry of transform {type(step).__name__} ({step!r})"
            )
    return CropGeometry(
        original_size=(int(original_size[0]), int(original_size[1])),
        input_size=tracker.size,
        scale=tracker.scale,
        offset=tracker.offset,
    )
