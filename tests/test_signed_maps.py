"""How a map's sign is drawn (`output.sign`): `signed` centres zero on the colormap's middle with a symmetric scale,
`positive` clips negatives, `absolute` draws |map|, `auto` picks `signed` for maps with negative values and keeps
non-negative (CAM-like) maps exactly as they were rendered before; every map reports its `sign` and `value_range`,
and `raw` never changes. Expected colours are re-derived here from matplotlib, not from the renderer's tables."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from api_schemas.explain import OutputOptions
from service.explain.render.geometry import CropGeometry
from service.explain.render.maps import render_map, render_options
from tests.helpers import (
    load_models,
    png_bytes,
    random_image,
    running_app,
    settings_for,
    tiny_cnn_config,
    tiny_vit_config,
)

ALL_FORMATS = ["heatmap_png", "overlay_png", "gray_png", "raw"]
# A 90x60 original into a 32x32 input (as in tests/test_rendering.py): `original` space has unseen pixels.
GEOMETRY = CropGeometry(original_size=(90, 60), input_size=(32, 32), scale=(0.6, 0.6), offset=(11.0, 2.0))
PHOTO_COLOUR = (200, 150, 100)  # a uniform photo: any resampling of it is this colour


def signed_map() -> torch.Tensor:
    """4x6: columns 0-1 are -1, columns 2-3 are 0, columns 4-5 are +2."""
    grid = torch.zeros(4, 6)
    grid[:, :2] = -1.0
    grid[:, 4:] = 2.0
    return grid


NEGATIVE, ZERO, POSITIVE = (slice(None), slice(0, 2)), (slice(None), slice(2, 4)), (slice(None), slice(4, 6))


def cam_like_map() -> torch.Tensor:
    """Non-negative with a positive minimum (as rollout maps are): min-max differs from 0..max scaling."""
    return torch.from_numpy(np.random.default_rng(3).uniform(0.5, 1.7, size=(4, 6)).astype(np.float32))


def photo() -> Image.Image:
    return Image.new("RGB", GEOMETRY.original_size, PHOTO_COLOUR)


def render(saliency: torch.Tensor, space: str = "tokens", **output):  # type: ignore[no-untyped-def]
    options = render_options(OutputOptions(format=ALL_FORMATS, space=space, **output), default_max_side=1024)
    return render_map(saliency, GEOMETRY, photo(), options)


def decode(data: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return np.asarray(image)


def colour(name: str, position: float) -> np.ndarray:
    """The colour of `name` at `position` in [0, 1], as 8-bit RGB: the colormap's 256-entry table at entry
    round(position * 255), as the renderer draws it. At 0, 0.25, 0.5 and 1 this is exactly matplotlib's
    `colormap(position)` (checked here); elsewhere matplotlib's floor(position * 256) may be the next entry."""
    entry = int(np.rint(position * 255))
    return np.rint(np.asarray(matplotlib.colormaps[name](entry)[:3]) * 255.0)


@pytest.mark.parametrize("name", ["RdBu_r", "jet", "viridis"])
def test_the_table_entries_used_here_are_matplotlibs_colours_at_0_quarter_half_and_1(name: str) -> None:
    for position in (0.0, 0.25, 0.5, 1.0):
        assert (colour(name, position) == np.rint(np.asarray(matplotlib.colormaps[name](position)[:3]) * 255)).all()


def rgba(name: str, position: float) -> np.ndarray:
    return np.append(colour(name, position), 255.0)


# --- signed ----------------------------------------------------------------------------------------------------


def test_signed_puts_zero_at_the_middle_colour_of_the_diverging_default_colormap() -> None:
    rendered = render(signed_map(), sign="signed")
    heatmap = decode(rendered.heatmap_png)
    assert (heatmap[ZERO] == rgba("RdBu_r", 0.5)).all()
    assert colour("RdBu_r", 0.5).min() >= 240  # near-white: zero reads as "nothing"


def test_signed_scales_symmetrically_by_the_largest_magnitude() -> None:
    rendered = render(signed_map(), sign="signed")
    heatmap = decode(rendered.heatmap_png)
    # m = max(|-1|, |2|) = 2: -2 would be the first colour, +2 is the last, -1 is a quarter of the way.
    assert (heatmap[POSITIVE] == rgba("RdBu_r", 1.0)).all()
    assert (heatmap[NEGATIVE] == rgba("RdBu_r", 0.25)).all()
    assert rendered.sign == "signed" and rendered.value_range == [-2.0, 2.0]
    mirrored = render(-signed_map(), sign="signed")
    assert (decode(mirrored.heatmap_png)[POSITIVE] == rgba("RdBu_r", 0.0)).all()  # -2: the first colour
    assert (decode(mirrored.heatmap_png)[NEGATIVE] == rgba("RdBu_r", 0.75)).all()  # +1


def test_signed_with_an_explicit_colormap_keeps_it_and_centres_zero() -> None:
    heatmap = decode(render(signed_map(), sign="signed", colormap="viridis").heatmap_png)
    assert (heatmap[ZERO] == rgba("viridis", 0.5)).all()
    assert (heatmap[NEGATIVE] == rgba("viridis", 0.25)).all() and (heatmap[POSITIVE] == rgba("viridis", 1.0)).all()
    jet = decode(render(signed_map(), colormap="jet").heatmap_png)  # naming the old default is a choice too
    assert (jet[ZERO] == rgba("jet", 0.5)).all()


def test_signed_overlay_shows_the_photo_at_zero_and_the_heatmap_at_alpha_at_the_extremes() -> None:
    alpha = 0.6
    overlay = decode(render(signed_map(), sign="signed", alpha=alpha).overlay_png).astype(np.float64)
    photo_px = np.asarray(PHOTO_COLOUR, dtype=np.float64)
    assert (overlay[ZERO] == photo_px).all()  # opacity 0 where the map is 0
    # Opacity alpha x |value| / m: alpha at +2, alpha / 2 at -1.
    assert np.abs(overlay[POSITIVE] - ((1 - alpha) * photo_px + alpha * colour("RdBu_r", 1.0))).max() <= 0.5
    half = alpha / 2
    assert np.abs(overlay[NEGATIVE] - ((1 - half) * photo_px + half * colour("RdBu_r", 0.25))).max() <= 0.5


def test_positive_and_absolute_overlays_blend_at_a_uniform_alpha() -> None:
    photo_px = np.asarray(PHOTO_COLOUR, dtype=np.float64)
    for sign, zero_position in (("positive", 0.0), ("absolute", 0.0)):
        overlay = decode(render(signed_map(), sign=sign, alpha=0.6).overlay_png).astype(np.float64)
        expected = 0.4 * photo_px + 0.6 * colour("jet", zero_position)
        assert np.abs(overlay[ZERO] - expected).max() <= 0.5, sign


def test_signed_gray_png_maps_minus_m_to_1_zero_to_32768_and_plus_m_to_65535() -> None:
    gray = decode(render(signed_map(), sign="signed").gray_png).astype(np.int64)
    assert (gray[ZERO] == 32768).all() and (gray[POSITIVE] == 65535).all()
    assert (np.abs(gray[NEGATIVE] - (1 + 0.25 * 65534)) <= 0.5).all()  # -1 of m = 2: a quarter
    assert (decode(render(-signed_map(), sign="signed").gray_png)[POSITIVE] == 1).all()  # -2 = -m


def test_signed_all_zero_map_is_the_middle_colour() -> None:
    rendered = render(torch.zeros(4, 6), sign="signed")
    assert (decode(rendered.heatmap_png) == rgba("RdBu_r", 0.5)).all()
    assert (decode(rendered.gray_png) == 32768).all() and rendered.value_range == [0.0, 0.0]


def test_signed_unseen_pixels_stay_transparent_and_gray_zero() -> None:
    rendered = render(signed_map(), space="original", sign="signed")
    raw = rendered.to_array()
    unseen = np.isnan(raw)
    assert unseen.any() and not unseen.all()
    assert (decode(rendered.heatmap_png)[unseen] == 0).all()
    assert (decode(rendered.gray_png)[unseen] == 0).all() and (decode(rendered.gray_png)[~unseen] >= 1).all()
    overlay = decode(rendered.overlay_png).astype(np.float64)
    assert np.abs(overlay[unseen] - 0.35 * np.asarray(PHOTO_COLOUR)).max() <= 0.5  # darkened, as for any sign
    m = float(np.abs(raw[~unseen]).max())
    assert rendered.value_range == pytest.approx([-m, m]) and m <= 2.0


# --- positive, absolute ----------------------------------------------------------------------------------------


def test_positive_clips_negatives_to_the_low_end() -> None:
    rendered = render(signed_map(), sign="positive")
    heatmap, gray = decode(rendered.heatmap_png), decode(rendered.gray_png).astype(np.int64)
    assert (heatmap[NEGATIVE] == rgba("jet", 0.0)).all() and (heatmap[ZERO] == rgba("jet", 0.0)).all()
    assert (heatmap[POSITIVE] == rgba("jet", 1.0)).all()
    assert (gray[NEGATIVE] == 1).all() and (gray[ZERO] == 1).all() and (gray[POSITIVE] == 65535).all()
    assert rendered.sign == "positive" and rendered.value_range == [0.0, 2.0]


def test_positive_of_an_all_negative_map_is_all_the_first_colour() -> None:
    rendered = render(-torch.ones(4, 6) - signed_map().abs(), sign="positive")
    assert (decode(rendered.heatmap_png) == rgba("jet", 0.0)).all() and rendered.value_range == [0.0, 0.0]


def test_absolute_draws_minus_one_and_plus_one_alike() -> None:
    grid = signed_map()
    grid[:2, 4:] = 1.0  # rows 0-1 of the right block: +1; rows 2-3 stay +2
    rendered = render(grid, sign="absolute")
    heatmap, gray = decode(rendered.heatmap_png), decode(rendered.gray_png).astype(np.int64)
    assert (heatmap[NEGATIVE] == rgba("jet", 0.5)).all() and (heatmap[:2, 4:] == rgba("jet", 0.5)).all()
    assert (heatmap[ZERO] == rgba("jet", 0.0)).all() and (heatmap[2:, 4:] == rgba("jet", 1.0)).all()
    assert (gray[NEGATIVE] == gray[0, 4]).all()
    assert rendered.sign == "absolute" and rendered.value_range == [0.0, 2.0]


# --- auto ------------------------------------------------------------------------------------------------------


def test_auto_renders_a_map_with_negative_values_signed() -> None:
    auto, signed = render(signed_map()), render(signed_map(), sign="signed")
    assert auto.sign == "signed" and auto.value_range == [-2.0, 2.0]
    for field in ("heatmap_png", "overlay_png", "gray_png"):
        assert getattr(auto, field) == getattr(signed, field), field


def test_auto_treats_float_noise_below_zero_as_non_negative() -> None:
    grid = cam_like_map()
    grid[0, 0] = -1e-9
    assert render(grid).sign == "positive"
    grid[0, 0] = -1e-5  # about 6e-6 of the largest magnitude: material
    assert render(grid).sign == "signed"


def expected_minmax_rendering(raw: np.ndarray, colormap: str) -> tuple[list[np.ndarray], np.ndarray]:
    """The rendering before signs existed, re-derived: min-max over the seen pixels, the colormap's entry
    round(norm * 255), gray 1 + round(norm * 65534). Returns, for the seen pixels, the RGB of that entry and of its
    two neighbours (a float32 rounding tie may land on one), and the gray values."""
    seen = ~np.isnan(raw)
    values = raw[seen].astype(np.float64)
    norm = (values - values.min()) / (values.max() - values.min())
    index = np.rint(norm * 255).astype(int)
    cmap = matplotlib.colormaps[colormap]
    rgb = [np.rint(cmap(np.clip(index + d, 0, 255))[:, :3] * 255) for d in (0, -1, 1)]
    return rgb, 1 + np.rint(norm * 65534)


@pytest.mark.parametrize("space", ["tokens", "original"])
@pytest.mark.parametrize("colormap", [None, "viridis"])
def test_auto_keeps_non_negative_maps_rendered_as_before(space: str, colormap: str | None) -> None:
    rendered = render(cam_like_map(), space=space, colormap=colormap, alpha=0.5)
    raw = rendered.to_array()
    seen = ~np.isnan(raw)
    assert rendered.sign == "positive"
    assert rendered.value_range == [float(np.nanmin(raw)), float(np.nanmax(raw))]  # min-max, not 0..max
    assert rendered.value_range[0] > 0.5 - 1e-6
    rgb, gray = expected_minmax_rendering(raw, colormap or "jet")
    heatmap = decode(rendered.heatmap_png)
    exact, below, above = (np.all(heatmap[seen][:, :3] == candidate, axis=-1) for candidate in rgb)
    assert exact.mean() > 0.99 and (exact | below | above).all() and (heatmap[seen][:, 3] == 255).all()
    assert np.abs(decode(rendered.gray_png)[seen].astype(np.int64) - gray).max() <= 1
    overlay = decode(rendered.overlay_png).astype(np.float64)[seen]
    assert np.abs(overlay - (0.5 * np.asarray(PHOTO_COLOUR) + 0.5 * heatmap[seen][:, :3])).max() <= 0.5
    explicit = render(cam_like_map(), space=space, colormap=colormap, alpha=0.5, sign="positive")
    assert (explicit.heatmap_png, explicit.overlay_png, explicit.gray_png) == (
        rendered.heatmap_png, rendered.overlay_png, rendered.gray_png)


def test_auto_decides_per_map() -> None:
    options = render_options(OutputOptions(format=["raw"], space="tokens"), default_max_side=1024)
    signs = [render_map(grid, GEOMETRY, photo(), options).sign for grid in (signed_map(), cam_like_map())]
    assert signs == ["signed", "positive"]


# --- what is reported, what never changes --------------------------------------------------------------------


@pytest.mark.parametrize(("saliency", "sign", "applied", "value_range"), [
    (signed_map(), "auto", "signed", [-2.0, 2.0]),
    (signed_map(), "positive", "positive", [0.0, 2.0]),
    (signed_map(), "absolute", "absolute", [0.0, 2.0]),
    (signed_map(), "signed", "signed", [-2.0, 2.0]),
    (torch.tensor([[0.5, 1.5], [1.0, 0.75]]), "auto", "positive", [0.5, 1.5]),
    (torch.tensor([[0.5, 1.5], [1.0, 0.75]]), "absolute", "absolute", [0.0, 1.5]),
    (torch.tensor([[0.5, 1.5], [1.0, 0.75]]), "signed", "signed", [-1.5, 1.5]),
])
def test_each_map_reports_the_sign_applied_and_its_value_range(
    saliency: torch.Tensor, sign: str, applied: str, value_range: list[float]
) -> None:
    rendered = render(saliency, sign=sign)
    assert rendered.sign == applied and rendered.value_range == value_range
    assert rendered.model_dump(mode="json")["value_range"] == value_range


def test_raw_is_the_unnormalised_map_whatever_the_sign() -> None:
    for space in ("tokens", "original"):
        raws = [render(signed_map(), space=space, sign=sign).raw.data
                for sign in ("auto", "positive", "absolute", "signed")]
        assert len(set(raws)) == 1, space
    np.testing.assert_array_equal(render(signed_map(), sign="positive").to_array(), signed_map().numpy())


def test_the_default_colormap_is_jet_unless_the_map_is_drawn_signed() -> None:
    default = render_options(OutputOptions(), default_max_side=512)
    assert (default.sign, default.colormap, default.signed_colormap) == ("auto", "jet", "RdBu_r")
    chosen = render_options(OutputOptions(colormap="magma", sign="absolute"), default_max_side=512)
    assert (chosen.sign, chosen.colormap, chosen.signed_colormap) == ("absolute", "magma", "magma")
    with pytest.raises(ValueError, match="nope"):
        render_options(OutputOptions(colormap="nope"), default_max_side=512)
    with pytest.raises(ValueError):
        OutputOptions(sign="both")


# --- over the API ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served_models():  # type: ignore[no-untyped-def]
    settings = settings_for(tiny_vit_config(), tiny_cnn_config(), cpu_workers=1)
    return settings, load_models(settings)


def post_all(served_models, requests: list[dict]) -> list:  # type: ignore[no-untyped-def]
    """POST each {model, methods, output} to /explain on one running app; the responses, in order."""
    settings, models = served_models
    data = png_bytes(random_image(21, size=(50, 40)))

    async def run() -> list:
        async with running_app(settings, models) as (client, _):
            answers = []
            for request in requests:
                fields = {"methods": json.dumps(request["methods"]), "output": json.dumps(request["output"])}
                answers.append(await client.post(f"/v1/models/{request['model']}/explain",
                                                 files={"file": ("x.png", data, "image/png")}, data=fields))
            return answers

    return asyncio.run(run())


def raw_of(rendered: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(rendered["raw"]["data"]), dtype="<f4").reshape(rendered["raw"]["shape"])


@pytest.mark.parametrize("model", ["tiny_vit", "tiny_cnn"])
def test_api_integrated_gradients_default_output_is_signed_and_gradcam_positive(served_models, model: str) -> None:
    (response,) = post_all(served_models, [{"model": model, "methods": ["integrated_gradients", "gradcam"],
                                            "output": {"format": ["heatmap_png", "raw"]}}])
    assert response.status_code == 200, response.text
    ig, gradcam = (e["results"][0]["map"] for e in response.json()["explanations"])
    assert ig["sign"] == "signed"
    bound = float(np.nanmax(np.abs(raw_of(ig))))
    assert ig["value_range"] == pytest.approx([-bound, bound]) and bound > 0
    assert ig["statistics"]["min"] < 0 < ig["statistics"]["max"]
    assert gradcam["sign"] == "positive"
    gradcam_raw = raw_of(gradcam)
    assert gradcam["value_range"] == pytest.approx([float(np.nanmin(gradcam_raw)), float(np.nanmax(gradcam_raw))])
    assert set(ig["statistics"]["peak"]) == {"row", "col", "x", "y"}


def test_api_raw_is_identical_across_sign_options_and_each_map_reports_its_sign(served_models) -> None:
    signs = ["auto", "positive", "absolute", "signed"]
    responses = post_all(served_models, [
        {"model": "tiny_vit", "methods": ["integrated_gradients"],
         "output": {"format": ["raw", "gray_png"], "space": "tokens", "sign": sign}} for sign in signs])
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    maps = [r.json()["explanations"][0]["results"][0]["map"] for r in responses]
    assert [m["sign"] for m in maps] == ["signed", "positive", "absolute", "signed"]
    assert len({m["raw"]["data"] for m in maps}) == 1
    assert maps[0]["gray_png"] == maps[3]["gray_png"] and maps[1]["gray_png"] != maps[3]["gray_png"]


def test_api_refuses_an_unknown_sign(served_models) -> None:
    (response,) = post_all(served_models, [{"model": "tiny_vit", "methods": ["rollout"],
                                            "output": {"sign": "both"}}])
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"
    assert "sign" in response.json()["error"]["message"]
