"""Projection, encoding and statistics of saliency maps, checked against independent arithmetic."""

from __future__ import annotations

import base64
import io
import math

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform

from api_schemas.explain import OutputOptions
from service.explain.render.geometry import CropGeometry, crop_geometry
from service.explain.render.maps import RenderOptions, map_statistics, project_map, render_map, render_options

# A 90x60 original into a 32x32 input at crop_pct 0.875: shorter side 60 -> 36 (scale 0.6), longer 90 -> 54;
# the 32x32 centre crop starts at left round(22 / 2) = 11, top round(4 / 2) = 2 (resized pixels).
GEOMETRY = CropGeometry(original_size=(90, 60), input_size=(32, 32), scale=(0.6, 0.6), offset=(11.0, 2.0))
BOX = (11 / 0.6, 2 / 0.6, 43 / 0.6, 34 / 0.6)


def smooth_map(rows: int = 4, cols: int = 4) -> torch.Tensor:
    """A positive map (every value >= 0.3), so `auto` renders it min-max as a CAM (tests/test_signed_maps.py: signs)."""
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float32), torch.arange(cols, dtype=torch.float32),
                          indexing="ij")
    return torch.sin(r * 1.3 + 0.4) + torch.cos(c * 0.9) * 0.7 + 0.05 * r * c + 2.0


def photo(size: tuple[int, int] = (90, 60), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def options(space: str, max_side: int = 1024, formats: tuple[str, ...] = ("heatmap_png", "overlay_png", "gray_png",
            "raw"), colormap: str = "jet", alpha: float = 0.5) -> RenderOptions:
    return RenderOptions(formats=formats, space=space, colormap=colormap, alpha=alpha, max_side=max_side)


def decode_png(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
    image.load()
    return image


def decode_raw(rendered) -> np.ndarray:  # type: ignore[no-untyped-def]
    assert rendered.raw.dtype == "float32"
    return np.frombuffer(base64.b64decode(rendered.raw.data), dtype="<f4").reshape(rendered.raw.shape)


def bilinear(grid: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Sample `grid` at continuous grid coordinates (cell centres at +0.5), clamping to the edge cells."""
    rows, cols = grid.shape
    x = np.clip(gx - 0.5, 0, cols - 1)
    y = np.clip(gy - 0.5, 0, rows - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, cols - 1), np.minimum(y0 + 1, rows - 1)
    fx, fy = x - x0, y - y0
    return ((1 - fy) * ((1 - fx) * grid[y0, x0] + fx * grid[y0, x1])
            + fy * ((1 - fx) * grid[y1, x0] + fx * grid[y1, x1]))


def expected_original(grid: np.ndarray, canvas: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Independent `original` projection for GEOMETRY: (values, seen) on a canvas of (width, height)."""
    width, height = canvas
    x = (np.arange(width) + 0.5) * 90 / width
    y = (np.arange(height) + 0.5) * 60 / height
    u, v = x * 0.6 - 11, y * 0.6 - 2  # input pixels
    gx, gy = np.meshgrid(u * grid.shape[1] / 32, v * grid.shape[0] / 32)
    seen = ((y >= BOX[1]) & (y < BOX[3]))[:, None] & ((x >= BOX[0]) & (x < BOX[2]))[None, :]
    return bilinear(grid, gx, gy), seen


def expected_norm(values: np.ndarray, seen: np.ndarray) -> np.ndarray:
    v = values.astype(np.float64)
    low, high = v[seen].min(), v[seen].max()
    return np.where(seen, (v - low) / (high - low), 0.0) if high > low else np.zeros_like(v)


def assert_colours(rgb: np.ndarray, norm: np.ndarray, seen: np.ndarray, name: str) -> None:
    """Seen pixels carry the colormap's entry round(norm * 255) (a neighbouring entry at a rounding tie)."""
    cmap = matplotlib.colormaps[name]
    index = np.rint(norm * 255).astype(int)
    candidates = [np.rint(cmap(np.clip(index + d, 0, 255))[..., :3] * 255) for d in (0, -1, 1)]
    exact = np.all(rgb == candidates[0], axis=-1)
    near = exact | np.all(rgb == candidates[1], axis=-1) | np.all(rgb == candidates[2], axis=-1)
    assert near[seen].all()
    assert exact[seen].mean() > 0.99


def test_geometry_fixture_matches_timm() -> None:
    transform = create_transform(input_size=(3, 32, 32), crop_pct=0.875, interpolation="bilinear")
    traced = crop_geometry(transform, (90, 60))
    assert traced.input_size == GEOMETRY.input_size
    assert traced.scale == pytest.approx(GEOMETRY.scale) and traced.offset == pytest.approx(GEOMETRY.offset)
    assert GEOMETRY.box == pytest.approx(BOX)


@pytest.mark.parametrize(("space", "max_side", "shape"), [
    ("tokens", 1024, (4, 4)), ("input", 1024, (32, 32)), ("original", 1024, (60, 90)), ("original", 45, (30, 45)),
    ("original", 90, (60, 90)), ("original", 8, (5, 8)),
])
def test_shapes_per_space(space: str, max_side: int, shape: tuple[int, int]) -> None:
    values, seen = project_map(smooth_map(), GEOMETRY, space, max_side)
    assert tuple(values.shape) == shape and tuple(seen.shape) == shape
    assert values.dtype == torch.float32 and seen.dtype == torch.bool
    rendered = render_map(smooth_map(), GEOMETRY, photo(), options(space, max_side))
    assert (rendered.height, rendered.width) == shape
    assert rendered.raw is not None and rendered.raw.shape == list(shape)


def test_tokens_and_input_all_seen() -> None:
    saliency = smooth_map()
    values, seen = project_map(saliency, GEOMETRY, "tokens", 1024)
    assert torch.equal(values, saliency) and bool(seen.all())
    values, seen = project_map(saliency, GEOMETRY, "input", 1024)
    assert bool(seen.all())
    reference = F.interpolate(saliency[None, None], size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
    assert torch.allclose(values, reference, atol=1e-6)
    centres = np.arange(32) + 0.5
    gx, gy = np.meshgrid(centres * 4 / 32, centres * 4 / 32)
    assert np.allclose(values.numpy(), bilinear(saliency.numpy(), gx, gy), atol=1e-5)


@pytest.mark.parametrize("max_side", [1024, 45])
@pytest.mark.parametrize("grid_shape", [(4, 4), (3, 5)])
def test_original_projection_matches_hand_arithmetic(max_side: int, grid_shape: tuple[int, int]) -> None:
    saliency = smooth_map(*grid_shape)
    values, seen = project_map(saliency, GEOMETRY, "original", max_side)
    canvas = (values.shape[1], values.shape[0])
    expected, expected_seen = expected_original(saliency.numpy().astype(np.float64), canvas)
    assert np.array_equal(seen.numpy(), expected_seen)
    assert np.allclose(values.numpy()[expected_seen], expected[expected_seen], atol=1e-5)


def test_seen_mask_is_the_crop_box() -> None:
    _, seen = project_map(smooth_map(), GEOMETRY, "original", 1024)
    mask = seen.numpy()
    # Pixel centres j + 0.5 inside [18.33, 71.67) -> columns 18..71; [3.33, 56.67) -> rows 3..56.
    assert np.flatnonzero(mask.any(axis=0)).tolist() == list(range(18, 72))
    assert np.flatnonzero(mask.any(axis=1)).tolist() == list(range(3, 57))
    assert mask[3:57, 18:72].all() and mask.sum() == 54 * 54


def test_original_equals_input_when_the_crop_is_the_image() -> None:
    identity = CropGeometry(original_size=(32, 32), input_size=(32, 32), scale=(1.0, 1.0), offset=(0.0, 0.0))
    original, seen = project_map(smooth_map(), identity, "original", 1024)
    upsampled, _ = project_map(smooth_map(), identity, "input", 1024)
    assert bool(seen.all()) and torch.allclose(original, upsampled, atol=1e-6)


@pytest.mark.parametrize("space", ["original", "input", "tokens"])
def test_pngs_decode_with_right_size_and_mode(space: str) -> None:
    rendered = render_map(smooth_map(), GEOMETRY, photo(), options(space, max_side=45))
    size = (rendered.width, rendered.height)
    for field, modes in [("heatmap_png", {"RGBA"}), ("overlay_png", {"RGB"}), ("gray_png", {"I;16", "I"})]:
        image = decode_png(getattr(rendered, field))
        assert image.format == "PNG" and image.size == size and image.mode in modes, field


def test_heatmap_gray_and_raw_agree_with_the_projection() -> None:
    saliency = smooth_map()
    rendered = render_map(saliency, GEOMETRY, photo(), options("original"))
    values, seen_t = project_map(saliency, GEOMETRY, "original", 1024)
    seen = seen_t.numpy()
    assert not seen.all() and seen.any()

    raw = decode_raw(rendered)
    assert np.isnan(raw[~seen]).all()
    assert np.array_equal(raw[seen], values.numpy()[seen])
    expected, _ = expected_original(saliency.numpy().astype(np.float64), (90, 60))
    assert np.allclose(raw[seen], expected[seen], atol=1e-5)

    norm = expected_norm(raw, seen)
    heatmap = np.asarray(decode_png(rendered.heatmap_png))
    assert (heatmap[..., 3] == np.where(seen, 255, 0)).all()
    assert_colours(heatmap[..., :3], norm, seen, "jet")

    gray = np.asarray(decode_png(rendered.gray_png)).astype(np.int64)
    assert (gray[~seen] == 0).all()
    assert gray.max() == 65535 and gray[seen].min() == 1
    peak = np.unravel_index(np.nanargmax(raw), raw.shape)
    assert gray[peak] == 65535
    assert np.abs(gray[seen] - (1 + np.rint(norm[seen] * 65534))).max() <= 1


@pytest.mark.parametrize(("space", "max_side", "alpha"), [("original", 1024, 0.5), ("original", 45, 0.3),
                                                          ("input", 1024, 0.7)])
def test_overlay_blends_over_the_model_view(space: str, max_side: int, alpha: float) -> None:
    image = photo()
    rendered = render_map(smooth_map(), GEOMETRY, image, options(space, max_side, alpha=alpha, colormap="viridis"))
    size = (rendered.width, rendered.height)
    if space == "original":
        base = image if size == image.size else image.resize(size, Image.Resampling.BILINEAR)
    else:
        base = image.resize(size, Image.Resampling.BILINEAR, box=BOX)
    base_px = np.asarray(base, dtype=np.float64)
    raw = decode_raw(rendered)
    seen = ~np.isnan(raw)
    heat = np.asarray(decode_png(rendered.heatmap_png))[..., :3].astype(np.float64)
    assert_colours(heat.astype(np.uint8), expected_norm(np.nan_to_num(raw), seen), seen, "viridis")
    expected = np.where(seen[..., None], (1 - alpha) * base_px + alpha * heat, 0.35 * base_px)
    overlay = np.asarray(decode_png(rendered.overlay_png), dtype=np.float64)
    assert np.abs(overlay - expected).max() <= 1.0
    if space == "original":
        assert not seen.all()  # the darkening was exercised


def test_overlay_of_a_padded_crop_shows_black_padding() -> None:
    # Border mode: 100x60 into 32x32 at crop_pct 1 pads 6 input rows at the top (and 7 at the bottom).
    transform = create_transform(input_size=(3, 32, 32), crop_pct=1.0, crop_mode="border", interpolation="bilinear")
    geometry = crop_geometry(transform, (100, 60))
    image = Image.fromarray(np.full((60, 100, 3), 200, dtype=np.uint8))
    rendered = render_map(smooth_map(), geometry, image, options("input", formats=("overlay_png", "heatmap_png")))
    overlay = np.asarray(decode_png(rendered.overlay_png), dtype=np.float64)
    heat = np.asarray(decode_png(rendered.heatmap_png))[..., :3].astype(np.float64)
    assert np.abs(overlay[:5] - 0.5 * heat[:5]).max() <= 1.0  # black padding under the heatmap
    assert np.abs(overlay[8:24] - (100 + 0.5 * heat[8:24])).max() <= 1.0  # the grey photo


@pytest.mark.parametrize("space", ["original", "input", "tokens"])
def test_constant_map_renders_cleanly(space: str) -> None:
    rendered = render_map(torch.full((4, 4), 3.5), GEOMETRY, photo(), options(space, colormap="viridis"))
    raw = decode_raw(rendered)
    seen = ~np.isnan(raw)
    assert seen.any() and np.allclose(raw[seen], 3.5)
    gray = np.asarray(decode_png(rendered.gray_png)).astype(np.int64)
    assert (gray[seen] == 1).all() and (gray[~seen] == 0).all()
    heatmap = np.asarray(decode_png(rendered.heatmap_png))
    bottom = np.rint(np.asarray(matplotlib.colormaps["viridis"](0.0)[:3]) * 255)
    assert (heatmap[seen][:, :3] == bottom).all() and (heatmap[seen][:, 3] == 255).all()
    overlay = np.asarray(decode_png(rendered.overlay_png))
    assert overlay.shape == (rendered.height, rendered.width, 3)
    assert rendered.statistics.entropy == pytest.approx(1.0)


def test_statistics_one_hot() -> None:
    saliency = torch.zeros(4, 4)
    saliency[1, 2] = 5.0
    stats = map_statistics(saliency, GEOMETRY)
    assert (stats.min, stats.max) == (0.0, 5.0)
    assert stats.entropy == pytest.approx(0.0, abs=1e-12) and stats.top10_mass == pytest.approx(1.0)
    assert (stats.peak.row, stats.peak.col) == (1, 2)
    # Cell (1, 2) centre in input pixels: (2.5 * 8, 1.5 * 8) = (20, 12); original = ((20 + 11) / 0.6, (12 + 2) / 0.6).
    assert (stats.peak.x, stats.peak.y) == pytest.approx((31 / 0.6, 14 / 0.6))


def test_statistics_uniform_and_shifted() -> None:
    stats = map_statistics(torch.full((4, 4), -2.0), GEOMETRY)
    assert stats.entropy == pytest.approx(1.0) and stats.top10_mass == pytest.approx(2 / 16)  # ceil(1.6) = 2 cells
    # 30 cells: 10% is exactly 3 cells; 31 cells: ceil(3.1) = 4.
    assert map_statistics(torch.ones(5, 6), GEOMETRY).top10_mass == pytest.approx(3 / 30)
    assert map_statistics(torch.ones(1, 31), GEOMETRY).top10_mass == pytest.approx(4 / 31)
    single = map_statistics(torch.tensor([[4.0]]), GEOMETRY)
    assert single.entropy == 0.0 and single.top10_mass == pytest.approx(1.0)
    assert (single.peak.row, single.peak.col) == (0, 0)


def test_statistics_match_numpy() -> None:
    saliency = smooth_map(3, 5) - 2.8  # has negative cells
    grid = saliency.numpy().astype(np.float64)
    p = (grid - grid.min()).ravel()
    p /= p.sum()
    nonzero = p[p > 0]
    stats = map_statistics(saliency, GEOMETRY)
    assert (stats.min, stats.max) == pytest.approx((grid.min(), grid.max()))
    assert stats.entropy == pytest.approx(-(nonzero * np.log(nonzero)).sum() / math.log(15))
    assert stats.top10_mass == pytest.approx(np.sort(p)[-2:].sum())
    row, col = np.unravel_index(grid.argmax(), grid.shape)
    assert (stats.peak.row, stats.peak.col) == (row, col)
    u, v = (col + 0.5) * 32 / 5, (row + 0.5) * 32 / 3
    assert (stats.peak.x, stats.peak.y) == pytest.approx(((u + 11) / 0.6, (v + 2) / 0.6))
    assert render_map(saliency, GEOMETRY, photo(), options("tokens", formats=("raw",))).statistics == stats


def test_render_options() -> None:
    defaults = render_options(OutputOptions(), default_max_side=512)
    assert defaults == RenderOptions(formats=("heatmap_png",), space="original", colormap="jet", alpha=0.5,
                                     max_side=512)
    custom = render_options(OutputOptions(format=["raw", "gray_png", "raw"], space="tokens", colormap="viridis",
                                          alpha=0.2, max_side=64), default_max_side=512)
    assert custom.formats == ("raw", "gray_png") and custom.max_side == 64 and custom.space == "tokens"
    with pytest.raises(ValueError, match="not_a_colormap.*unknown|unknown.*not_a_colormap"):
        render_options(OutputOptions(colormap="not_a_colormap"), default_max_side=512)


def test_only_requested_formats_are_filled() -> None:
    rendered = render_map(smooth_map(), GEOMETRY, photo(), options("original", formats=("gray_png",)))
    assert rendered.gray_png is not None
    assert rendered.heatmap_png is None and rendered.overlay_png is None and rendered.raw is None
