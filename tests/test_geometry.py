"""The traced crop geometry predicts where original pixels land in the real transform's output."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.transforms import CenterCropOrPad, MaybeToTensor, ResizeKeepRatio, TrimBorder
from torchvision import transforms as T

from service.explain.render.geometry import CropGeometry, UnsupportedTransformError, crop_geometry

SQUARE = 3  # side of the bright square, original pixels
MARGIN = 3.0  # input pixels kept clear of the crop edges when asserting where a square lands


def eval_transform(input_size: tuple[int, int, int], crop_pct: float, crop_mode: str) -> T.Compose:
    return create_transform(input_size=input_size, crop_pct=crop_pct, crop_mode=crop_mode,
                            interpolation="bilinear", mean=(0, 0, 0), std=(1, 1, 1))


def square_image(size: tuple[int, int], x0: int, y0: int) -> Image.Image:
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[y0:y0 + SQUARE, x0:x0 + SQUARE] = 255
    return Image.fromarray(pixels)


def landing(output: torch.Tensor) -> tuple[float, float, float]:
    """(u, v) centroid of the brightness in input pixel coordinates (centres at +0.5), and the total."""
    plane = output[0].double().numpy()
    total = plane.sum()
    u = (plane.sum(axis=0) * (np.arange(plane.shape[1]) + 0.5)).sum() / max(total, 1e-12)
    v = (plane.sum(axis=1) * (np.arange(plane.shape[0]) + 0.5)).sum() / max(total, 1e-12)
    return float(u), float(v), float(total)


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
@pytest.mark.parametrize("crop_pct", [0.875, 1.0])
@pytest.mark.parametrize("input_size", [(3, 32, 32), (3, 32, 48), (3, 48, 32)])
@pytest.mark.parametrize("original", [(100, 60), (60, 100), (33, 77)])
def test_points_land_where_predicted(
    crop_mode: str, crop_pct: float, input_size: tuple[int, int, int], original: tuple[int, int]
) -> None:
    transform = eval_transform(input_size, crop_pct, crop_mode)
    geometry = crop_geometry(transform, original)
    assert geometry.original_size == original
    assert geometry.input_size == (input_size[2], input_size[1])
    width, height = original
    in_w, in_h = geometry.input_size
    # Squares aimed at a 3x3 grid inside the crop (placed by inverting the geometry), plus the image's corners.
    aims = [geometry.input_to_original(u, v) for u, v in itertools.product(
        np.linspace(MARGIN + 1, in_w - MARGIN - 1, 3), np.linspace(MARGIN + 1, in_h - MARGIN - 1, 3))]
    starts = {(int(np.clip(round(x - SQUARE / 2), 0, width - SQUARE)), int(np.clip(round(y - SQUARE / 2), 0,
              height - SQUARE))) for x, y in aims}
    starts |= set(itertools.product([0, width - SQUARE], [0, height - SQUARE]))
    inside = outside = 0
    for x0, y0 in sorted(starts):
        output = transform(square_image(original, int(x0), int(y0)))
        assert tuple(output.shape) == input_size
        u, v = geometry.original_to_input(x0 + SQUARE / 2, y0 + SQUARE / 2)
        if MARGIN <= u <= in_w - MARGIN and MARGIN <= v <= in_h - MARGIN:
            got_u, got_v, _ = landing(output)
            assert got_u == pytest.approx(u, abs=0.3) and got_v == pytest.approx(v, abs=0.3), (x0, y0)
            inside += 1
        elif not (-MARGIN <= u <= in_w + MARGIN and -MARGIN <= v <= in_h + MARGIN):
            assert float(output.max()) < 0.02, (x0, y0, u, v)  # cropped away: nothing lands
            outside += 1
    assert inside >= 4
    if crop_mode == "center" and crop_pct < 1.0:
        assert outside >= 1  # some corners of the image are cut off


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
def test_round_trip(crop_mode: str) -> None:
    geometry = crop_geometry(eval_transform((3, 32, 48), 0.875, crop_mode), (33, 77))
    for x, y in [(0.0, 0.0), (12.3, 40.7), (33.0, 77.0)]:
        assert geometry.input_to_original(*geometry.original_to_input(x, y)) == pytest.approx((x, y))


def test_box_explicit_arithmetic() -> None:
    # 100x60, input 32x32, crop_pct 0.875: shorter side 60 -> floor(32 / 0.875) = 36, longer int(36 * 100 / 60) = 60;
    # centre crop 32 from 60x36: left = round(28 / 2) = 14, top = round(4 / 2) = 2; scale 36 / 60 = 0.6.
    geometry = crop_geometry(eval_transform((3, 32, 32), 0.875, "center"), (100, 60))
    assert geometry.scale == pytest.approx((0.6, 0.6))
    assert geometry.offset == pytest.approx((14.0, 2.0))
    assert geometry.box == pytest.approx((14 / 0.6, 2 / 0.6, 46 / 0.6, 34 / 0.6))
    assert geometry.input_to_original(16.0, 16.0) == pytest.approx((50.0, 30.0))


def test_squash_box_is_whole_image_at_full_crop() -> None:
    geometry = crop_geometry(eval_transform((3, 32, 48), 1.0, "squash"), (33, 77))
    assert geometry.scale == pytest.approx((48 / 33, 32 / 77))
    assert geometry.box == pytest.approx((0.0, 0.0, 33.0, 77.0))


def test_border_mode_pads_short_side() -> None:
    # 100x60 into 32x32 at crop_pct 1: longest side 100 -> 32, shorter round(60 / 3.125) = 19; pad 13 -> top -6.
    geometry = crop_geometry(eval_transform((3, 32, 32), 1.0, "border"), (100, 60))
    assert geometry.scale == pytest.approx((0.32, 19 / 60))
    assert geometry.offset == pytest.approx((0.0, -6.0))
    left, top, right, bottom = geometry.box
    assert (left, right) == pytest.approx((0.0, 100.0))
    assert top < 0 and bottom > 60


def test_torchvision_center_crop_pads_when_larger() -> None:
    # Resize(20): 100x60 -> short 20, long int(20 * 100 / 60) = 33; CenterCrop(32) pads height 20 by 6 on top,
    # then crops width 33 at left int(round(0.5)) = 0.
    transform = T.Compose([T.Resize(20), T.CenterCrop(32), T.ToTensor()])
    geometry = crop_geometry(transform, (100, 60))
    assert geometry.input_size == (32, 32)
    assert geometry.scale == pytest.approx((0.33, 1 / 3))
    assert geometry.offset == pytest.approx((0.0, -6.0))
    output = transform(square_image((100, 60), 48, 28))
    u, v, _ = landing(output)
    assert (u, v) == pytest.approx(geometry.original_to_input(49.5, 29.5), abs=0.3)


def test_resize_max_size_and_list_and_other_steps() -> None:
    # Resize(30, max_size=40) on 100x60: 30 x int(30 * 100 / 60) = 50 > 40 -> long 40, short int(40 * 30 / 50) = 24.
    steps = [TrimBorder(2), T.Resize(30, max_size=40), CenterCropOrPad((20, 36)), MaybeToTensor()]
    geometry = crop_geometry(steps, (104, 64))
    assert geometry.input_size == (36, 20)
    assert geometry.scale == pytest.approx((0.4, 0.4))
    assert geometry.offset == pytest.approx((2 * 0.4 + 2, 2 * 0.4 + 2))
    output = T.Compose(steps)(square_image((104, 64), 50, 30))
    assert tuple(output.shape) == (3, 20, 36)
    u, v, _ = landing(output)
    assert (u, v) == pytest.approx(geometry.original_to_input(51.5, 31.5), abs=0.3)


def test_resize_keep_ratio_shortest() -> None:
    transform = T.Compose([ResizeKeepRatio((36, 54)), T.CenterCrop((32, 48)), T.ToTensor()])
    geometry = crop_geometry(transform, (33, 77))
    # ratio = min(77 / 36, 33 / 54) = 33 / 54 -> (round(77 * 54 / 33), 54) = (126, 54) as (h, w)
    assert geometry.input_size == (48, 32)
    assert geometry.scale == pytest.approx((54 / 33, 126 / 77))
    assert geometry.offset == pytest.approx((3.0, 47.0))


def test_unsupported_transform_is_named() -> None:
    with pytest.raises(UnsupportedTransformError, match="RandomHorizontalFlip"):
        crop_geometry(T.Compose([T.Resize(32), T.RandomHorizontalFlip(), T.ToTensor()]), (40, 40))
    with pytest.raises(UnsupportedTransformError, match="random"):
        crop_geometry([ResizeKeepRatio(32, random_scale_prob=0.5)], (40, 40))


def test_geometry_is_frozen() -> None:
    geometry = CropGeometry((10, 10), (5, 5), (0.5, 0.5), (0.0, 0.0))
    with pytest.raises(AttributeError):
        geometry.scale = (1.0, 1.0)  # type: ignore[misc]
