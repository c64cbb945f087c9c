"""Class-specific maps of real weights point at the right object.

EfficientNet-Lite0 with its real ImageNet weights (`package:efficientnet-lite0`, no shared file needed) explains a
composition of two scikit-image photos side by side: the cat `chelsea` and the `coffee` cup, in both orders (so a
left/right bias cannot pass). For the cat class the map's positive mass must lie mostly on the cat's half of the
model's input, for the cup class on the cup's half.

The criterion: at least twice as much positive mass on the explained object's half as on the other (a share above
2/3) for both targets in both orders. Every class-specific CNN method is classified: PASSING ones are asserted here,
NOT_PASSING ones carry their measured shares (and those that are cheap are checked to still fall short, strictly,
so that one that starts passing gets moved). The README lists the methods that do not pass.
"""

from __future__ import annotations

import asyncio
import base64
import math
from typing import Any

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from service.config import ModelConfig
from tests.helpers import png_bytes, running_app, settings_for

MODEL_ID = "efficientnet_lite0"
CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
CUP_CLASSES = {504, 967, 968}  # coffee mug, espresso, cup
# The model's most probable cat class and cup class on the composition, in both orders (on chelsea alone it prefers
# tiger cat 282, on coffee alone espresso 967; on the composition Egyptian cat is first and cup fourth).
TARGETS = {"cat": 285, "cup": 968}
ORDERS = {"cat|cup": ("cat", "cup"), "cup|cat": ("cup", "cat")}
MIN_SHARE = 2 / 3
PHOTO_SIDE = 300
GREY = 128  # the mean of the model's normalisation: zero input

# Methods whose maps pass, measured on CPU (cat|cup cat, cat|cup cup, cup|cat cat, cup|cat cup): cam 0.926, 0.746,
# 0.885, 0.762 (absolute values of the signed map: 0.909, 0.746, 0.838, 0.761); gradcam 0.919, 0.746, 0.882, 0.761.
# auto (default candidates) chose gradcam's map in all four cases: 0.919, 0.746, 0.882, 0.761. lrp (default
# composite epsilon_plus_flat): 0.793, 0.752, 0.895, 0.677 (the smallest margin: 0.677 against 2/3).
PASSING = ("auto", "cam", "gradcam", "lrp")

# Methods that do not pass, with their measured shares of positive mass on the explained object's half (CPU,
# default params): (cat|cup cat, cat|cup cup, cup|cat cat, cup|cat cup). Signed maps give the same figures within
# 0.05 with absolute values, except vit_cx (cat|cup cup: 1.000 positive but 0.309 absolute: nearly all of that map
# is negative).
NOT_PASSING: dict[str, tuple[float, float, float, float]] = {
    "gradcam_pp": (0.696, 0.594, 0.658, 0.642),
    "layercam": (0.678, 0.585, 0.637, 0.635),
    "saliency": (0.552, 0.618, 0.575, 0.655),
    "input_x_gradient": (0.327, 0.805, 0.325, 0.842),  # the cat's map lies mostly on the cup
    "integrated_gradients": (0.711, 0.578, 0.656, 0.589),
    "smoothgrad": (0.689, 0.551, 0.642, 0.603),
    "vit_cx": (0.579, 1.000, 0.568, 0.621),
}
# With espresso (967) as the cup class the split is the same: the smallest shares are cam 0.877, gradcam 0.872,
# gradcam_pp 0.625, layercam 0.611. Integrated gradients with other baselines: blur 0.632, mean 0.442 (like input
# x gradient).
# Too slow to re-run here on CPU (default params, per request of one target on 2 cores: integrated gradients ~11 s,
# smoothgrad ~5 s, vit_cx ~40 s); the others are re-run and must still fall short.
NOT_RECHECKED = {"integrated_gradients", "smoothgrad", "vit_cx"}
RUN = (*PASSING, *(m for m in NOT_PASSING if m not in NOT_RECHECKED))


def central_square(photo: np.ndarray, side: int) -> np.ndarray:
    """The photo's central square, resized to side x side."""
    height, width = photo.shape[:2]
    square = min(height, width)
    top, left = (height - square) // 2, (width - square) // 2
    crop = Image.fromarray(photo[top:top + square, left:left + square])
    return np.asarray(crop.resize((side, side), Image.Resampling.BICUBIC))


def composition(left: np.ndarray, right: np.ndarray, crop_pct: float) -> tuple[np.ndarray, tuple[int, int]]:
    """The two photos side by side, centred on a grey square canvas large enough that the model's centre crop
    (crop_pct of the shorter side) keeps both whole; returns the canvas and the strip's (left, right) columns."""
    strip = np.concatenate([central_square(left, PHOTO_SIDE), central_square(right, PHOTO_SIDE)], axis=1)
    height, width = strip.shape[:2]
    side = math.ceil(width / crop_pct)
    side += (side - width) % 2  # the strip exactly centred: its middle is the input's middle
    canvas = np.full((side, side, 3), GREY, dtype=np.uint8)
    top, left_edge = (side - height) // 2, (side - width) // 2
    canvas[top:top + height, left_edge:left_edge + width] = strip
    return canvas, (left_edge, left_edge + width)


def decode_raw(raw: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(raw["data"]), dtype="<f4").reshape(raw["shape"])


def share_on_half(values: np.ndarray, side: str) -> float:
    """Share of the map's mass on its left or right half (NaN, where unseen, counts as nothing)."""
    values = np.nan_to_num(values, nan=0.0)
    middle = values.shape[1] // 2
    half = values[:, :middle] if side == "left" else values[:, middle:]
    return float(half.sum() / values.sum())


async def _explain_compositions() -> dict[str, Any]:
    config = ModelConfig(id=MODEL_ID, architecture="tf_efficientnet_lite0", weights="package:efficientnet-lite0",
                         max_batch_size=2, warmup_batch_sizes=[1], timeout_s=120.0, max_request_cost=200)
    photos = {"cat": skdata.chelsea(), "cup": skdata.coffee()}
    found: dict[str, Any] = {"predictions": {}, "seen": {}, "maps": {}}
    async with running_app(settings_for(config)) as (client, _):
        catalogue = (await client.get("/v1/methods")).json()["methods"]
        found["registry"] = {m["name"] for m in catalogue if "cnn" in m["families"] and m["class_specific"]}
        preprocessing = (await client.get(f"/v1/models/{MODEL_ID}")).json()["preprocessing"]
        assert preprocessing["crop_mode"] == "center", preprocessing
        for order, (left, right) in ORDERS.items():
            image, (strip_left, strip_right) = composition(photos[left], photos[right], preprocessing["crop_pct"])
            encoded = base64.b64encode(png_bytes(image)).decode()
            for name, index in TARGETS.items():
                response = await client.post(f"/v1/models/{MODEL_ID}/explain", json={
                    "image": encoded, "methods": list(RUN), "target": index, "top_k": 10,
                    "output": {"format": ["raw"], "space": "input"},
                })
                assert response.status_code == 200, response.text
                body = response.json()
                found["predictions"][order] = [(p["index"], p["probability"]) for p in body["predictions"]]
                box = body["crop_box"]
                found["seen"][order] = (box["left"] <= strip_left + 1 and box["right"] >= strip_right - 1, box)
                for result in body["explanations"]:
                    (explanation,) = result["results"]
                    assert explanation["target"]["index"] == index
                    found["maps"][(result["method"], order, name)] = decode_raw(explanation["map"]["raw"])
    return found


@pytest.fixture(scope="module")
def explained() -> dict[str, Any]:
    """One explain request with every re-run method per (order, target): 4 requests, made once for the module."""
    return asyncio.run(_explain_compositions())


def test_every_class_specific_cnn_method_is_classified(explained: dict[str, Any]) -> None:
    assert not set(PASSING) & set(NOT_PASSING)
    assert set(PASSING) | set(NOT_PASSING) == explained["registry"], (
        "classify each class-specific CNN method as PASSING or NOT_PASSING (with its measured shares; README too)"
    )


@pytest.mark.parametrize("order", ORDERS)
def test_the_model_sees_both_photos_and_ranks_a_cat_and_a_cup_class(explained: dict[str, Any], order: str) -> None:
    in_crop, box = explained["seen"][order]
    assert in_crop, box  # the centre crop holds both photos whole
    predictions = explained["predictions"][order]
    ranked = [index for index, _ in predictions]
    assert ranked[0] == TARGETS["cat"], predictions
    assert TARGETS["cup"] in ranked[:5], predictions
    assert next(i for i in ranked if i in CUP_CLASSES) == TARGETS["cup"], predictions


def _shares(explained: dict[str, Any], method: str) -> dict[tuple[str, str], float]:
    shares = {}
    for order, (left, _) in ORDERS.items():
        for name in TARGETS:
            values = np.clip(explained["maps"][(method, order, name)], 0.0, None)
            shares[(order, name)] = share_on_half(values, "left" if name == left else "right")
    return shares


@pytest.mark.parametrize("method", PASSING)
def test_class_specific_maps_lie_on_the_explained_object(explained: dict[str, Any], method: str) -> None:
    shares = _shares(explained, method)
    assert min(shares.values()) > MIN_SHARE, shares


@pytest.mark.parametrize("method", [m for m in NOT_PASSING if m not in NOT_RECHECKED])
def test_methods_listed_as_not_passing_still_fall_short(explained: dict[str, Any], method: str) -> None:
    shares = _shares(explained, method)
    assert min(shares.values()) <= MIN_SHARE, (
        f"{method} now passes ({shares}): move it to PASSING and off the README's list"
    )
