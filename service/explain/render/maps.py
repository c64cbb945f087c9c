"""Turning a saliency map on the token / feature grid into what the API returns: PNGs, raw arrays, statistics.

Shared by every explanation method. A map is projected into the requested space (`tokens`: as is; `input`: upsampled
over the model's input crop; `original`: resampled onto the original image, bounded by `max_side`, where pixels the
model never saw are marked unseen), then encoded in each requested format.

Colours: each map gets a sign rendering (`output.sign`, `auto` resolved per map from the map's grid) that fixes the
colour scale [low, high] in map units; the PNGs draw low..high as the colormap's first..last colour (gray 1..65535):
- `positive`: negatives clipped to 0, low = max(min, 0), high = max: for a non-negative map, min-max as ever;
- `absolute`: |map|, low = 0, high = max |map|;
- `signed`: low = -m, high = m, m = max |map|, so 0 is the colormap's middle (a diverging one, `RdBu_r`, unless the
  request names a colormap); `overlay_png` blends it with opacity alpha * |value| / m, so where the map is near 0 the
  photo shows through, and at -m or +m the heatmap has the request's `alpha`.
The scale is taken over the seen pixels of the projected map (what is drawn); `raw` is the projected map as is.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from functools import lru_cache

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from api_schemas.explain import MapStatistics, OutputOptions, Peak, RawArray, RenderedMap
from service.explain.render.geometry import CropGeometry
from service.png import png_base64

UNSEEN_BRIGHTNESS = 0.35  # overlay_png: brightness of pixels the model never saw
PNG_COMPRESS_LEVEL = 1  # speed over size
RESIZE_REDUCING_GAP = 3.0  # PIL's fast pre-reduction for large downscales of the photo (overlay only)
CONSTANT_RTOL = 1e-6  # a seen range below this fraction of the magnitude is float noise: the map is constant
SIGNED_RTOL = 1e-6  # `auto`: a map is signed when its minimum is below -SIGNED_RTOL x its largest magnitude
COLORMAP = "jet"  # the default colormap of `positive` and `absolute` renderings
SIGNED_COLORMAP = "RdBu_r"  # the default of `signed` ones: diverging, blue < 0, near-white at 0, red > 0
SIGNS = ("auto", "positive", "absolute", "signed")
SPACES = ("original", "input", "tokens")
FORMATS = ("heatmap_png", "overlay_png", "gray_png", "raw")


@dataclass(frozen=True)
class RenderOptions:
    """Validated output options for one request."""

    formats: tuple[str, ...]
    space: str  # original | input | tokens
    colormap: str  # for `positive` and `absolute` renderings
    alpha: float
    max_side: int
    sign: str = "auto"  # auto | positive | absolute | signed
    signed_colormap: str = SIGNED_COLORMAP  # for `signed` renderings


def render_options(output: OutputOptions, default_max_side: int) -> RenderOptions:
    """Validate the request's output options; `default_max_side` applies when the request sets none. A colormap the
    request names is used for every sign; without one, `positive` and `absolute` get COLORMAP, `signed` the diverging
    SIGNED_COLORMAP."""
    if output.colormap is not None and output.colormap not in matplotlib.colormaps:
        raise ValueError(f"unknown colormap {output.colormap!r}: use a matplotlib colormap name such as 'jet'")
    if output.sign not in SIGNS:
        raise ValueError(f"unknown sign {output.sign!r}; expected one of {SIGNS}")
    return RenderOptions(
        formats=tuple(dict.fromkeys(output.format)),  # deduplicated, order kept
        space=output.space,
        colormap=output.colormap or COLORMAP,
        alpha=float(output.alpha),
        max_side=int(output.max_side if output.max_side is not None else default_max_side),
        sign=output.sign,
        signed_colormap=output.colormap or SIGNED_COLORMAP,
    )


def canvas_size(original_size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(width, height) of an `original`-space map: the original size scaled down so its longest side <= max_side."""
    width, height = original_size
    factor = min(1.0, max_side / max(width, height))
    return max(1, round(width * factor)), max(1, round(height * factor))


def project_map(
    saliency: torch.Tensor, geometry: CropGeometry, space: str, max_side: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Project a (h, w) map into `space`: returns (values (H, W) float32, seen (H, W) bool), on the CPU."""
    grid = saliency.detach().to(device="cpu", dtype=torch.float32)
    if grid.ndim != 2:
        raise ValueError(f"expected a (h, w) map, got shape {tuple(grid.shape)}")
    in_w, in_h = geometry.input_size
    if space == "tokens":
        return grid.clone(), torch.ones(grid.shape, dtype=torch.bool)
    if space == "input":
        values = F.interpolate(grid[None, None], size=(in_h, in_w), mode="bilinear", align_corners=False)[0, 0]
        return values, torch.ones(values.shape, dtype=torch.bool)
    if space != "original":
        raise ValueError(f"unknown space {space!r}; expected one of {SPACES}")
    out_w, out_h = canvas_size(geometry.original_size, max_side)
    orig_w, orig_h = geometry.original_size
    # Canvas pixel centres -> original coordinates -> input coordinates (per axis: the geometry is separable).
    x = (torch.arange(out_w, dtype=torch.float64) + 0.5) * (orig_w / out_w)
    y = (torch.arange(out_h, dtype=torch.float64) + 0.5) * (orig_h / out_h)
    u = x * geometry.scale[0] - geometry.offset[0]
    v = y * geometry.scale[1] - geometry.offset[1]
    # The grid covers the input uniformly, so normalised grid_sample coordinates do not depend on its size.
    gx = (2.0 * u / in_w - 1.0).float()
    gy = (2.0 * v / in_h - 1.0).float()
    sample_at = torch.stack((gx[None, :].expand(out_h, out_w), gy[:, None].expand(out_h, out_w)), dim=-1)
    values = F.grid_sample(grid[None, None], sample_at[None], mode="bilinear", padding_mode="border",
                           align_corners=False)[0, 0]
    seen = ((v >= 0) & (v < in_h))[:, None] & ((u >= 0) & (u < in_w))[None, :]
    return values, seen


def map_statistics(saliency: torch.Tensor, geometry: CropGeometry) -> MapStatistics:
    """Statistics of a (h, w) map on its own grid; the peak is also given in original pixels."""
    grid = saliency.detach().to(device="cpu", dtype=torch.float64)
    rows, cols = grid.shape
    cells = rows * cols
    flat = grid.reshape(-1)
    low, high = float(flat.min()), float(flat.max())
    shifted = flat - low
    total = float(shifted.sum())
    p = shifted / total if total > 0 else torch.full_like(flat, 1.0 / cells)
    if cells > 1:
        nonzero = p[p > 0]
        entropy = float(-(nonzero * nonzero.log()).sum()) / math.log(cells)
    else:
        entropy = 0.0
    top_cells = (cells + 9) // 10  # ceil(10%)
    top10_mass = float(p.topk(top_cells).values.sum())
    # The centre: cells whose centres lie in the middle half of each side ([1/4, 3/4] of the crop).
    row_centre = ((torch.arange(rows, dtype=torch.float64) + 0.5) / rows - 0.5).abs() <= 0.25
    col_centre = ((torch.arange(cols, dtype=torch.float64) + 0.5) / cols - 0.5).abs() <= 0.25
    centre_mass = float(p.reshape(rows, cols)[row_centre][:, col_centre].sum())
    row, col = divmod(int(flat.argmax()), cols)
    in_w, in_h = geometry.input_size
    peak_x, peak_y = geometry.input_to_original((col + 0.5) * in_w / cols, (row + 0.5) * in_h / rows)
    return MapStatistics(
        min=low,
        max=high,
        entropy=min(1.0, max(0.0, entropy)),
        top10_mass=min(1.0, max(0.0, top10_mass)),
        border_mass=min(1.0, max(0.0, 1.0 - centre_mass)),
        peak=Peak(row=row, col=col, x=peak_x, y=peak_y),
    )


@lru_cache(maxsize=64)
def colormap_lut(name: str) -> np.ndarray:
    """The colormap sampled into a read-only (256, 3) uint8 RGB table."""
    table = matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3]
    lut = np.rint(table * 255.0).astype(np.uint8)
    lut.setflags(write=False)
    return lut


def resolve_sign(sign: str, low: float, high: float) -> str:
    """The sign rendering of a map whose grid spans [low, high]: `auto` is `signed` when the map has material
    negative values (low < -SIGNED_RTOL x max(|low|, |high|)), else `positive`; any other choice stands."""
    if sign != "auto":
        return sign
    return "signed" if low < -SIGNED_RTOL * max(abs(low), abs(high)) else "positive"


def colour_scale(values: np.ndarray, seen: np.ndarray, sign: str) -> tuple[np.ndarray, float, float]:
    """(norm, low, high): the colour scale [low, high] of the seen pixels for `sign` (positive | absolute | signed)
    and the values placed on it, clipped to [0, 1] (0 where unseen). A map with no range is all 0 (`signed`: an
    all-zero map is all 0.5, the middle)."""
    norm = np.zeros(values.shape, dtype=np.float32)
    if not seen.any():
        return norm, 0.0, 0.0
    if sign == "signed":
        bound = float(np.abs(values[seen]).max())
        if bound > 0.0:
            np.clip(0.5 + 0.5 * (values / bound), 0.0, 1.0, out=norm)
        else:
            norm.fill(0.5)
        norm[~seen] = 0.0
        return norm, -bound, bound
    if sign == "absolute":
        magnitude = np.abs(values)
        high = float(magnitude[seen].max())
        if high > 0.0:
            np.clip(magnitude / high, 0.0, 1.0, out=norm)
            norm[~seen] = 0.0
        return norm, 0.0, high
    if sign != "positive":
        raise ValueError(f"unknown sign {sign!r}; expected positive, absolute or signed")
    # Negatives clip to 0; a non-negative map is min-max normalised, exactly as before signs were offered.
    low, high = max(float(values[seen].min()), 0.0), max(float(values[seen].max()), 0.0)
    # Interpolating a constant map leaves float32 rounding noise: treat a range that small as constant.
    if high - low > CONSTANT_RTOL * max(abs(low), abs(high)):
        np.clip((values - low) / (high - low), 0.0, 1.0, out=norm)
        norm[~seen] = 0.0
    else:
        high = low
    return norm, low, high


def model_view(image: Image.Image, geometry: CropGeometry, space: str, size: tuple[int, int]) -> Image.Image:
    """The RGB image under a map of `size`: the whole original for `original`, else the input crop region."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    if space == "original":
        box = (0.0, 0.0, float(rgb.width), float(rgb.height))
    else:
        box = geometry.box
        left, top, right, bottom = box
        if left < 0 or top < 0 or right > rgb.width or bottom > rgb.height:
            # The crop reaches past the image (padding): cut an integer region (black outside), then resize.
            region = (math.floor(left), math.floor(top), math.ceil(right), math.ceil(bottom))
            rgb = rgb.crop(region)
            box = (left - region[0], top - region[1], right - region[0], bottom - region[1])
    if rgb.size == size and box == (0.0, 0.0, float(rgb.width), float(rgb.height)):
        return rgb
    return rgb.resize(size, Image.Resampling.BILINEAR, box=box, reducing_gap=RESIZE_REDUCING_GAP)


def render_map(
    saliency: torch.Tensor, geometry: CropGeometry, image: Image.Image, options: RenderOptions
) -> RenderedMap:
    """Project a (h, w) map into the requested space and encode it in every requested format."""
    unknown = [f for f in options.formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown output format(s) {unknown}; expected any of {FORMATS}")
    statistics = map_statistics(saliency, geometry)
    sign = resolve_sign(options.sign, statistics.min, statistics.max)
    projected, seen_t = project_map(saliency, geometry, options.space, options.max_side)
    values, seen = projected.numpy(), seen_t.numpy()
    height, width = values.shape
    norm, low, high = colour_scale(values, seen, sign)
    heatmap_png: str | None = None
    overlay_png: str | None = None
    gray_png: str | None = None
    raw_array: RawArray | None = None
    if "heatmap_png" in options.formats or "overlay_png" in options.formats:
        colormap = options.signed_colormap if sign == "signed" else options.colormap
        colours = colormap_lut(colormap)[np.rint(norm * 255.0).astype(np.uint8)]  # (H, W, 3)
        if "heatmap_png" in options.formats:
            rgba = np.zeros((height, width, 4), dtype=np.uint8)
            rgba[..., :3] = colours
            rgba[..., 3] = 255
            rgba[~seen] = 0
            heatmap_png = png_base64(rgba, PNG_COMPRESS_LEVEL)
        if "overlay_png" in options.formats:
            if image.size != geometry.original_size:
                raise ValueError(f"image size {image.size} does not match the geometry's {geometry.original_size}")
            photo = np.asarray(model_view(image, geometry, options.space, (width, height)), dtype=np.float32)
            if sign == "signed":  # opacity alpha x |value| / m: the photo shows where the map is near 0
                opacity = (options.alpha * np.abs(2.0 * norm - 1.0))[..., None]
                blended = (1.0 - opacity) * photo + opacity * colours.astype(np.float32)
            else:
                blended = (1.0 - options.alpha) * photo + options.alpha * colours.astype(np.float32)
            overlay = np.where(seen[..., None], blended, photo * UNSEEN_BRIGHTNESS)
            overlay_png = png_base64(np.clip(np.rint(overlay), 0, 255).astype(np.uint8), PNG_COMPRESS_LEVEL)
    if "gray_png" in options.formats:
        gray = np.zeros((height, width), dtype=np.uint16)
        gray[seen] = 1 + np.rint(norm[seen] * 65534.0).astype(np.uint16)
        gray_png = png_base64(gray, PNG_COMPRESS_LEVEL)
    if "raw" in options.formats:
        raw = values.astype("<f4", copy=True)
        raw[~seen] = np.nan
        raw_array = RawArray(shape=[height, width], data=base64.b64encode(raw.tobytes()).decode("ascii"))
    return RenderedMap(
        width=width, height=height, sign=sign, value_range=[low, high], heatmap_png=heatmap_png,
        overlay_png=overlay_png, gray_png=gray_png, raw=raw_array, statistics=statistics,
    )
