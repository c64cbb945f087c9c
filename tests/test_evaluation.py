"""Faithfulness metrics (deletion, insertion, positive and negative perturbation): their curves equal a plain
re-derivation and quantus's PixelFlipping, batched equals per-map, chunking changes nothing, a map of what the model
uses beats a map of what it ignores on every metric, and through the API each map gets its scores, within the
request's budget."""

from __future__ import annotations

import base64
import io
import json
from typing import Any, AsyncIterator, get_args

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter
from torch import nn

from api_schemas.explain import EvaluationMetric
from service.explain.captures import ModelRunner
from service.explain.evaluation import (
    METRICS,
    MapToEvaluate,
    blurred,
    evaluate_maps,
    forward_passes,
    probability_curves,
)
from tests.helpers import png_bytes, random_image, running_app, settings_for, tiny_cnn_config, tiny_vit_config

SIDE = 32


class QuadrantModel(nn.Module):
    """Class 0's logit grows with the energy of the top-left quadrant of channel 0; class 1's is constant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        energy = (x[:, 0, : SIDE // 2, : SIDE // 2] ** 2).mean((1, 2))
        return torch.stack([4.0 * energy, torch.ones_like(energy)], 1)


class OneChannelNet(nn.Module):
    """A small nonlinear classifier of 1-channel images (3 classes), fixed by a seed."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 5, padding=2)
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 8).flatten(1))


def runner(model: nn.Module, chunk_size: int = 64) -> ModelRunner:
    return ModelRunner(model.eval(), torch.device("cpu"), torch.float32, chunk_size)


def textured(seed: int, channels: int = 3, side: int = SIDE) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(channels, side, side)).astype(np.float32))


def quadrant_maps() -> tuple[torch.Tensor, torch.Tensor]:
    """(a map on the quadrant the model reads, a map on the opposite one), on a 4x4 grid."""
    good, bad = torch.zeros(4, 4), torch.zeros(4, 4)
    good[:2, :2] = torch.arange(4.0).view(2, 2) + 1
    bad[2:, 2:] = torch.arange(4.0).view(2, 2) + 1
    return good, bad


def test_every_metric_of_the_api_is_defined_with_its_cost() -> None:
    assert set(METRICS) == set(get_args(EvaluationMetric))
    assert forward_passes(["deletion", "insertion"]) == 34  # 16 steps, both ends included
    assert forward_passes(["positive_perturbation", "negative_perturbation"]) == 20  # 0% .. 90%


def test_a_map_of_what_the_model_uses_beats_a_map_of_what_it_ignores_on_every_metric() -> None:
    good, bad = quadrant_maps()
    pixels = textured(1)
    scores_good, scores_bad = evaluate_maps(
        runner(QuadrantModel()), [MapToEvaluate(pixels, good, 0), MapToEvaluate(pixels, bad, 0)], list(METRICS))
    for name, definition in METRICS.items():
        better = scores_good[name] > scores_bad[name] if definition.higher_is_better else \
            scores_good[name] < scores_bad[name]
        assert better, (name, scores_good[name], scores_bad[name])


def plain_curve(model: nn.Module, pixels: torch.Tensor, saliency: torch.Tensor, target: int, name: str) -> np.ndarray:
    """A re-derivation with numpy: rank the cells, blow each cell up to its pixel block with np.kron, perturb."""
    definition = METRICS[name]
    h, w = saliency.shape
    flat = saliency.numpy().ravel()
    order = np.argsort(-flat if definition.most_salient_first else flat, kind="stable")
    image = pixels.numpy()
    substitute = blurred(pixels).numpy() if definition.substitute == "blur" else np.zeros_like(image)
    values = []
    for fraction in definition.fractions:
        chosen = np.zeros(h * w)
        chosen[order[: int(round(fraction * h * w))]] = 1
        mask = np.kron(chosen.reshape(h, w), np.ones((SIDE // h, SIDE // w))).astype(bool)[None]
        perturbed = np.where(mask, image, substitute) if definition.reveal else np.where(mask, substitute, image)
        with torch.no_grad():
            probabilities = model(torch.from_numpy(perturbed)[None]).softmax(-1)[0]
        values.append(float(probabilities[target]))
    return np.array(values)


@pytest.mark.parametrize("name", list(METRICS))
@pytest.mark.parametrize("grid", [4, 8, SIDE], ids=["grid4", "grid8", "pixels"])
def test_curves_equal_a_plain_re_derivation(name: str, grid: int) -> None:
    model = QuadrantModel()
    pixels = textured(2)
    saliency = torch.from_numpy(np.random.default_rng(grid).normal(size=(grid, grid)).astype(np.float32))
    (curves,) = probability_curves(runner(model), [MapToEvaluate(pixels, saliency, 0)], [name])
    np.testing.assert_allclose(curves[name].numpy(), plain_curve(model, pixels, saliency, 0, name), atol=1e-6)
    (scores,) = evaluate_maps(runner(model), [MapToEvaluate(pixels, saliency, 0)], [name])
    expected = np.trapezoid(curves[name].numpy(), METRICS[name].fractions) / (
        METRICS[name].fractions[-1] - METRICS[name].fractions[0])
    assert scores[name] == pytest.approx(float(expected), abs=1e-6)


def test_the_blur_is_rise_s_gaussian_with_mirrored_edges() -> None:
    pixels = textured(3)
    sigma = 5.0 * SIDE / 224  # RISE's sigma 5 at 224 px, scaled to the input
    radius = round(2 * sigma)  # RISE's kernel of 11 at sigma 5
    expected = np.stack([gaussian_filter(c, sigma, mode="mirror", truncate=radius / sigma) for c in pixels.numpy()])
    np.testing.assert_allclose(blurred(pixels).numpy(), expected, atol=1e-5)


def test_batched_maps_equal_each_map_alone_and_chunking_changes_nothing() -> None:
    model = OneChannelNet()
    rng = np.random.default_rng(4)
    items = [MapToEvaluate(textured(10 + i, channels=1), torch.from_numpy(rng.normal(size=(8, 8)).astype(np.float32)),
                           target=i % 3) for i in range(3)]
    together = evaluate_maps(runner(model, chunk_size=7), items, list(METRICS))
    for item, scores in zip(items, together):
        (alone,) = evaluate_maps(runner(model, chunk_size=64), [item], list(METRICS))
        for name in METRICS:
            assert scores[name] == pytest.approx(alone[name], abs=1e-6)


quantus = pytest.importorskip("quantus")


def quantus_curve(model: nn.Module, pixels: torch.Tensor, saliency: torch.Tensor, target: int, steps: int,
                  perturb_func: Any = None) -> np.ndarray:
    """quantus.PixelFlipping's curve: the target's probability after each step of `steps` equal steps (it has no
    point for the unperturbed input)."""
    metric = quantus.PixelFlipping(features_in_step=saliency.numel() // steps, perturb_baseline=0.0, normalise=False,
                                   perturb_func=perturb_func, disable_warnings=True)
    (curve,) = metric(model=model, x_batch=pixels.numpy()[None], y_batch=np.array([target]),
                      a_batch=saliency.numpy()[None, None], device="cpu", softmax=True, channel_first=True)
    return np.array(curve)


def test_positive_and_negative_perturbation_agree_with_quantus_pixel_flipping() -> None:
    model = OneChannelNet().eval()
    pixels = textured(5, channels=1, side=20)  # 400 pixels: 10% steps of exactly 40
    saliency = torch.from_numpy(np.random.default_rng(5).normal(size=(20, 20)).astype(np.float32))
    (curves,) = probability_curves(runner(model), [MapToEvaluate(pixels, saliency, 1)],
                                   ["positive_perturbation", "negative_perturbation"])
    # ours: 0%, 10% .. 90% removed, set to 0 (the mean colour once normalised); quantus: 10% .. 100%, baseline 0
    np.testing.assert_allclose(curves["positive_perturbation"][1:].numpy(),
                               quantus_curve(model, pixels, saliency, 1, 10)[:9], atol=1e-5)
    np.testing.assert_allclose(curves["negative_perturbation"][1:].numpy(),
                               quantus_curve(model, pixels, -saliency, 1, 10)[:9], atol=1e-5)


def test_deletion_agrees_with_quantus_pixel_flipping_given_the_blurred_substitute() -> None:
    model = OneChannelNet().eval()
    pixels = textured(6, channels=1)
    saliency = torch.from_numpy(np.random.default_rng(6).normal(size=(SIDE, SIDE)).astype(np.float32))
    substitute = blurred(pixels).numpy().reshape(-1)

    def replace_by_blurred(arr: np.ndarray, indices: Any, **kwargs: Any) -> np.ndarray:
        perturbed = arr.copy()
        for row in range(arr.shape[0]):
            perturbed[row, indices[row]] = substitute[indices[row]]
        return perturbed

    (curves,) = probability_curves(runner(model), [MapToEvaluate(pixels, saliency, 2)], ["deletion"])
    np.testing.assert_allclose(curves["deletion"][1:].numpy(),
                               quantus_curve(model, pixels, saliency, 2, 16, replace_by_blurred), atol=1e-5)


# --- through the API -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def served_app() -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    settings = settings_for(tiny_vit_config(), tiny_cnn_config(max_request_cost=300), device="cpu")
    async with running_app(settings) as (http, app):
        yield http, app


@pytest.fixture(scope="module")
def client(served_app: tuple[httpx.AsyncClient, Any]) -> httpx.AsyncClient:
    return served_app[0]


IMAGE = png_bytes(random_image(8))


def explain(client: httpx.AsyncClient, model: str, **fields: Any) -> Any:
    body = {"image": base64.b64encode(IMAGE).decode(), "output": {"format": ["raw"], "space": "tokens"}, **fields}
    return client.post(f"/v1/models/{model}/explain", json=body)


def raw(result: dict[str, Any]) -> np.ndarray:
    data = result["map"]["raw"]
    return np.frombuffer(base64.b64decode(data["data"]), dtype="<f4").reshape(data["shape"])


@pytest.mark.anyio
async def test_each_map_gets_the_requested_scores_and_none_unasked(client: httpx.AsyncClient) -> None:
    response = await explain(client, "tiny_cnn", methods=["gradcam", "saliency"], target={"top_k": 2},
                             evaluate=["deletion", "insertion"])
    assert response.status_code == 200, response.text
    body = response.json()
    for explanation in body["explanations"]:
        assert [r["evaluation"]["target"] for r in explanation["results"]] == [p["index"] for p in body["predictions"][:2]]
        for result in explanation["results"]:
            evaluation = result["evaluation"]
            assert 0 <= evaluation["deletion"] <= 1 and 0 <= evaluation["insertion"] <= 1
            assert evaluation["positive_perturbation"] is None and evaluation["negative_perturbation"] is None
    plain = await explain(client, "tiny_cnn", methods=["gradcam"])
    assert plain.json()["explanations"][0]["results"][0]["evaluation"] is None


@pytest.mark.anyio
async def test_api_scores_equal_evaluating_the_returned_map_on_the_model(
    served_app: tuple[httpx.AsyncClient, Any]
) -> None:
    """The server's scores are those of its returned (token-space) map on the served model and preprocessed input."""
    client, app = served_app
    response = await explain(client, "tiny_vit", methods=["rollout"], evaluate=list(METRICS))
    assert response.status_code == 200, response.text
    result = response.json()["explanations"][0]["results"][0]
    assert result["target"] is None  # class-agnostic: scored for the image's first target, the top-1 class
    assert result["evaluation"]["target"] == response.json()["predictions"][0]["index"]
    served = app.state.service.models["tiny_vit"]
    pixels = served.transform(Image.open(io.BytesIO(IMAGE)).convert("RGB"))
    (expected,) = evaluate_maps(runner(served.network), [MapToEvaluate(pixels, torch.from_numpy(raw(result).copy()),
                                                                       result["evaluation"]["target"])], list(METRICS))
    for name in METRICS:
        assert result["evaluation"][name] == pytest.approx(expected[name], abs=1e-5), name


@pytest.mark.anyio
async def test_evaluation_counts_in_the_request_budget(client: httpx.AsyncClient) -> None:
    # tiny_cnn's max_request_cost is 300 here: 5 targets x 2 methods x 34 passes is over it
    response = await explain(client, "tiny_cnn", methods=["gradcam", "saliency"], target={"top_k": 5},
                             evaluate=["deletion", "insertion"])
    assert response.status_code == 422 and response.json()["error"]["code"] == "over_budget"
    assert "evaluate: 340 = 34 passes (deletion + insertion) x 10 map(s)" in response.json()["error"]["message"]


@pytest.mark.anyio
async def test_evaluate_may_be_repeated_multipart_fields_and_unknown_metrics_are_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/models/tiny_cnn/explain", files={"file": ("a.png", IMAGE, "image/png")},
                                 data={"methods": "gradcam", "evaluate": ["insertion", "negative_perturbation"]})
    assert response.status_code == 200, response.text
    evaluation = response.json()["explanations"][0]["results"][0]["evaluation"]
    assert evaluation["insertion"] is not None and evaluation["negative_perturbation"] is not None
    refused = await explain(client, "tiny_cnn", methods=["gradcam"], evaluate=["pointing_game"])
    assert refused.status_code == 422 and refused.json()["error"]["message"].startswith("evaluate.0:")


@pytest.mark.anyio
async def test_the_methods_catalogue_lists_the_metrics_and_their_cost(client: httpx.AsyncClient) -> None:
    listed = (await client.get("/v1/methods")).json()["evaluation_metrics"]
    by_name = {m["name"]: m for m in listed}
    assert set(by_name) == set(METRICS)
    assert by_name["deletion"]["forward_passes"] == 17 and not by_name["deletion"]["higher_is_better"]
    assert by_name["insertion"]["higher_is_better"] and json.dumps(by_name["insertion"]["description"])
