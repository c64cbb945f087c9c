"""saliency, input_x_gradient, smoothgrad and integrated_gradients against Captum on the same model and inputs;
IG completeness; batched equals per-image; chunked passes; per-target maps; the completeness gap over HTTP."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
import torch
from captum.attr import InputXGradient, IntegratedGradients, NoiseTunnel, Saliency
from scipy.ndimage import gaussian_filter

from api_schemas import MethodSpec
from service.explain.requests import MethodRequestError, resolve_methods
from service.explain.targets import TargetRequest
from service.http.uploads import decode_image
from tests.explain_helpers import VIT_VARIANTS, RecordRunnerCalls, explain_direct, random_pixels, served_model, stack_maps
from tests.helpers import load_models, png_bytes, random_image, running_app, settings_for, tiny_vit_config

CNN = ("test_resnet", {"num_classes": 10})
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def vit():
    return served_model(*VIT_VARIANTS["vit"], seed=4)


@pytest.fixture(scope="module")
def cnn():
    return served_model(*CNN, size=32, seed=1, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def assert_close_scaled(ours: torch.Tensor, reference: torch.Tensor, rel: float = 1e-4) -> None:
    """Equal up to `rel` of the reference's largest magnitude (maps of random models are small numbers)."""
    torch.testing.assert_close(ours, reference, atol=rel * float(reference.abs().max()), rtol=rel)


def index_targets(targets: list[int]) -> list[TargetRequest]:
    return [TargetRequest(index=t) for t in targets]


def magnitude(values: torch.Tensor, how: str) -> torch.Tensor:
    values = values.abs()
    return {"max": values.amax(1), "mean": values.mean(1), "l2": values.norm(dim=1)}[how]


def attribution(values: torch.Tensor, how: str) -> torch.Tensor:
    return {"sum": values.sum(1), "abs_sum": values.abs().sum(1), "l2": values.norm(dim=1)}[how]


@pytest.mark.parametrize("model_key", ["vit", "cnn"])
@pytest.mark.parametrize("reduce", ["max", "mean", "l2"])
def test_saliency_matches_captum(model_key, reduce, vit, cnn) -> None:
    served = vit if model_key == "vit" else cnn
    pixels = random_pixels(served, 3, seed=2)
    targets = [3, 0, 7]
    outcomes = explain_direct(served, pixels, [{"name": "saliency", "params": {"reduce": reduce}}],
                              targets=index_targets(targets))
    ours = stack_maps(outcomes)
    assert ours.shape == (3, *served.input_size[1:])  # input resolution
    reference = Saliency(served.active_network).attribute(pixels.clone(), target=targets)  # abs=True
    assert_close_scaled(ours, magnitude(reference, reduce))


@pytest.mark.parametrize("reduce", ["sum", "abs_sum", "l2"])
def test_input_x_gradient_matches_captum(reduce, vit) -> None:
    pixels = random_pixels(vit, 2, seed=3)
    targets = [5, 1]
    outcomes = explain_direct(vit, pixels, [{"name": "input_x_gradient", "params": {"reduce": reduce}}],
                              targets=index_targets(targets))
    reference = InputXGradient(vit.active_network).attribute(pixels.clone(), target=targets)
    assert_close_scaled(stack_maps(outcomes), attribution(reference, reduce))


@pytest.mark.parametrize("variant,nt_type", [("plain", "smoothgrad"), ("squared", "smoothgrad_sq"),
                                             ("var", "vargrad")])
def test_smoothgrad_matches_captum_noise_tunnel(variant, nt_type, vit) -> None:
    """Captum draws its noise with torch.normal on the global generator: seeding it with our seed gives the same
    draws as our seeded generator (3x32x32 images: a multiple of 16 values, so drawing the samples one at a time or
    all together gives the same numbers on the CPU)."""
    pixels = random_pixels(vit, 2, seed=5)
    targets = [2, 8]
    params = {"samples": 6, "noise": 0.2, "variant": variant, "seed": 11, "reduce": "mean"}
    ours = stack_maps(explain_direct(vit, pixels, [{"name": "smoothgrad", "params": params}],
                                      targets=index_targets(targets), chunk_size=4))  # samples straddle chunks
    tunnel = NoiseTunnel(Saliency(vit.active_network))
    for i, target in enumerate(targets):
        stdev = float(0.2 * (pixels[i].max() - pixels[i].min()))
        torch.manual_seed(11)
        reference = tunnel.attribute(pixels[i:i + 1].clone(), nt_type=nt_type, nt_samples=6, stdevs=stdev,
                                     target=target, abs=False)
        assert_close_scaled(ours[i], magnitude(reference, "mean")[0])


def test_smoothgrad_noise_follows_the_seed(vit) -> None:
    pixels = random_pixels(vit, 1, seed=5)
    maps = [stack_maps(explain_direct(vit, pixels, [{"name": "smoothgrad", "params": {"samples": 3, "seed": s}}]))
            for s in (0, 0, 1)]
    torch.testing.assert_close(maps[0], maps[1], atol=0, rtol=0)
    assert not torch.allclose(maps[0], maps[2])


def black(served) -> torch.Tensor:
    mean = torch.tensor(served.data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(served.data_config["std"]).view(1, 3, 1, 1)
    return (0.0 - mean) / std


@pytest.mark.parametrize("integration", ["gausslegendre", "riemann_trapezoid"])
@pytest.mark.parametrize("baseline", ["black", "mean", "blur"])
def test_integrated_gradients_matches_captum(integration, baseline, cnn) -> None:
    pixels = random_pixels(cnn, 2, seed=7)
    targets = [4, 9]
    steps = 5
    params = {"steps": steps, "integration": integration, "baseline": baseline, "blur_sigma": 1.5}
    outcomes = explain_direct(cnn, pixels, [{"name": "integrated_gradients", "params": params}],
                               targets=index_targets(targets), chunk_size=3)
    if baseline == "black":
        baselines = black(cnn).expand_as(pixels)
    elif baseline == "mean":
        baselines = pixels.mean(dim=(2, 3), keepdim=True).expand_as(pixels)
    else:
        baselines = torch.from_numpy(gaussian_filter(pixels.numpy(), sigma=(0, 0, 1.5, 1.5), mode="nearest",
                                                     truncate=3.0))
    attributions, delta = IntegratedGradients(cnn.active_network).attribute(
        pixels.clone(), baselines=baselines.contiguous(), target=targets, n_steps=steps, method=integration,
        return_convergence_delta=True,
    )
    if integration == "riemann_trapezoid":
        # Captum weighs the trapezoid's points by 1/steps (ends halved): its weights sum to (steps - 1) / steps.
        # Ours are the trapezoid rule's 1/(steps - 1): the same points, weights in proportion.
        scale = steps / (steps - 1)
        f_x = cnn.active_network(pixels).gather(1, torch.tensor(targets)[:, None])[:, 0]
        f_b = cnn.active_network(baselines.contiguous()).gather(1, torch.tensor(targets)[:, None])[:, 0]
        attributions = attributions * scale
        delta = attributions.sum(dim=(1, 2, 3)) - (f_x - f_b)
    assert_close_scaled(stack_maps(outcomes), attributions.sum(1))
    gaps = torch.tensor([o.methods[0].statistics[0]["completeness_gap"] for o in outcomes])
    torch.testing.assert_close(gaps, delta.float(), atol=1e-4, rtol=1e-3)


def test_integrated_gradients_noise_baseline_is_seeded_and_in_range(cnn, monkeypatch) -> None:
    from service.explain.methods import integrated_gradients as ig

    seen: list[torch.Tensor] = []
    original = ig.make_baselines
    monkeypatch.setattr(ig, "make_baselines", lambda *a: seen.append(original(*a)) or seen[-1])
    pixels = random_pixels(cnn, 2, seed=8)
    for seed in (3, 3, 4):
        explain_direct(cnn, pixels, [{"name": "integrated_gradients",
                                      "params": {"steps": 2, "baseline": "noise", "seed": seed}}])
    torch.testing.assert_close(seen[0], seen[1], atol=0, rtol=0)
    assert not torch.allclose(seen[0], seen[2])
    low, high = pixels.amin(dim=(2, 3), keepdim=True), pixels.amax(dim=(2, 3), keepdim=True)
    assert ((seen[0] >= low) & (seen[0] <= high)).all()
    assert seen[0].std() > 0.2 * (high - low).mean()  # noise, not a constant


def test_integrated_gradients_completeness_improves_with_steps(cnn) -> None:
    """The gap shrinks as steps grow (not monotonically: the ReLUs make the integrand kinked)."""
    pixels = random_pixels(cnn, 2, seed=9)
    targets = [1, 6]
    f_x = cnn.active_network(pixels).gather(1, torch.tensor(targets)[:, None])[:, 0]
    f_b = cnn.active_network(black(cnn).expand_as(pixels).contiguous()).gather(1, torch.tensor(targets)[:, None])[:, 0]
    gaps = []
    for steps in (2, 16, 128):
        params = {"steps": steps, "integration": "riemann_trapezoid"}
        outcomes = explain_direct(cnn, pixels, [{"name": "integrated_gradients", "params": params}],
                                  targets=index_targets(targets))
        total = stack_maps(outcomes).sum(dim=(1, 2))  # reduce=sum: the map sums to the total attribution
        reported = torch.tensor([o.methods[0].statistics[0]["completeness_gap"] for o in outcomes])
        torch.testing.assert_close(reported, total - (f_x - f_b), atol=1e-4, rtol=1e-3)
        gaps.append(reported.abs())
    assert (gaps[0] > 0.01).all()  # the model is far from linear along the path
    assert gaps[1].mean() < gaps[0].mean() / 5 and gaps[2].mean() < gaps[1].mean() / 2
    assert (gaps[2] < gaps[0] / 20).all() and (gaps[2] < 0.01 * (f_x - f_b).abs()).all()


METHODS = [
    {"name": "saliency"},
    {"name": "input_x_gradient"},
    {"name": "smoothgrad", "params": {"samples": 3}},
    {"name": "integrated_gradients", "params": {"steps": 3, "baseline": "blur", "blur_sigma": 2.0}},
]


def test_batched_equals_per_image_and_passes_stay_chunked(vit, monkeypatch) -> None:
    pixels = random_pixels(vit, 3, seed=10)
    targets = [TargetRequest(index=2), TargetRequest(top_k=2), TargetRequest(top_k=1)]
    calls = RecordRunnerCalls(monkeypatch)
    batched = explain_direct(vit, pixels, METHODS, targets=targets, chunk_size=4)
    assert calls.sizes and max(calls.sizes) <= 4
    # smoothgrad, first target slot: 3 images x 3 samples share passes of 4, 4 and 1 images
    assert calls.sizes[:3] == [4, 4, 1]
    for i in range(3):
        single = explain_direct(vit, pixels[i:i + 1], METHODS, targets=[targets[i]], chunk_size=5)[0]
        assert batched[i].targets == single.targets
        for ours, theirs in zip(batched[i].methods, single.methods):
            for a, b in zip(ours.maps, theirs.maps):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
        gaps = [[s["completeness_gap"] for s in outcome.methods[3].statistics] for outcome in (batched[i], single)]
        assert gaps[0] == pytest.approx(gaps[1], abs=1e-5)


def test_different_targets_give_different_maps(cnn) -> None:
    pixels = random_pixels(cnn, 1, seed=12)
    outcome = explain_direct(cnn, pixels, METHODS, target=TargetRequest(top_k=2))[0]
    for method in outcome.methods:
        assert len(method.maps) == 2
        first, second = method.maps
        assert not torch.allclose(first - first.mean(), second - second.mean())


def test_invalid_params_are_rejected(vit) -> None:
    for spec in ({"name": "smoothgrad", "params": {"samples": 0}},
                 {"name": "integrated_gradients", "params": {"steps": 1}},
                 {"name": "integrated_gradients", "params": {"integration": "riemann_left"}},
                 {"name": "saliency", "params": {"reduce": "sum"}}):
        with pytest.raises(MethodRequestError) as info:
            resolve_methods([MethodSpec(**spec)], vit.family, vit.anatomy)
        assert "params" in str(info.value)


def test_completeness_gap_and_input_resolution_maps_over_http() -> None:
    settings = settings_for(tiny_vit_config())
    models = load_models(settings)
    data = png_bytes(random_image(3, size=(50, 40)))
    methods = [{"name": "integrated_gradients", "params": {"steps": 4}}, "saliency"]

    async def post(output: dict) -> dict:
        async with running_app(settings, models) as (client, _):
            response = await client.post(
                "/v1/models/tiny_vit/explain", files={"file": ("x.png", data, "image/png")},
                data={"methods": json.dumps(methods), "output": json.dumps(output)},
            )
        assert response.status_code == 200, response.text
        return response.json()

    body = asyncio.run(post({"format": ["raw"], "space": "input"}))
    served = models["tiny_vit"]
    pixels = served.preprocess(decode_image(data, 10**8)).unsqueeze(0)
    direct = explain_direct(served, pixels, methods)[0]
    ig, saliency = body["explanations"]
    ig_map = ig["results"][0]["map"]
    assert ig_map["statistics"]["completeness_gap"] == pytest.approx(
        direct.methods[0].statistics[0]["completeness_gap"], abs=1e-5)
    assert saliency["results"][0]["map"]["statistics"]["completeness_gap"] is None
    raw = np.frombuffer(base64.b64decode(ig_map["raw"]["data"]), dtype="<f4").reshape(ig_map["raw"]["shape"])
    assert raw.shape == served.input_size[1:]  # input-resolution map, input space: as is
    np.testing.assert_allclose(raw, direct.methods[0].maps[0].numpy(), atol=1e-6)
    original = asyncio.run(post({"format": ["heatmap_png"], "space": "original"}))
    assert original["explanations"][0]["results"][0]["map"]["width"] == 50


def test_passes_default_to_the_models_explain_chunk_size(monkeypatch) -> None:
    served = served_model(*CNN, size=32, seed=1)
    served.config = served.config.model_copy(update={"explain_chunk_size": 2})
    calls = RecordRunnerCalls(monkeypatch)
    explain_direct(served, random_pixels(served, 1, seed=2), [{"name": "smoothgrad", "params": {"samples": 5}}],
                   target=TargetRequest(index=1))
    assert calls.sizes == [2, 2, 1]
