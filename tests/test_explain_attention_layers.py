"""attention_layers (one map per block plus an aggregate) and the token choice of raw_attention and rollout."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from api_schemas import MethodSpec
from service.explain.requests import MethodRequestError, resolve_methods
from tests.attention_reference import discard_plainly, explicit_forward, fuse, residual
from tests.explain_helpers import VIT_VARIANTS, explain_direct, random_pixels, served_model
from tests.helpers import png_bytes, random_image, running_app, settings_for, tiny_vit_config

NO_CLASS_TOKEN = ("vit_tiny_patch16_224", dict(VIT_VARIANTS["vit"][1], class_token=False, global_pool="avg"))


def attentions_of(served, pixels) -> list[np.ndarray]:
    with torch.no_grad():
        return [a.double().numpy() for a in explicit_forward(served.active_network, pixels).attentions]


@pytest.mark.parametrize("variant", ["vit", "deit_distilled", "registers_nonsquare", "patch32_nonsquare"])
@pytest.mark.parametrize(("layers", "head_fusion", "aggregate"), [
    (None, "mean", "mean"), ([2, 0], "max", "max"), ([-1, 2, 1], "min", "min"), ([0, -1], "mean", "rollout"),
    (None, "max", "rollout"),
])
def test_attention_layers_matches_per_layer_class_rows(variant, layers, head_fusion, aggregate) -> None:
    served = served_model(*VIT_VARIANTS[variant], seed=12)
    pixels = random_pixels(served, 3, seed=12)
    attentions = attentions_of(served, pixels)
    params = {"head_fusion": head_fusion, "aggregate": aggregate} | ({} if layers is None else {"layers": layers})
    outcomes = explain_direct(served, pixels, [{"name": "attention_layers", "params": params}])
    prefix, grid = served.anatomy.num_prefix_tokens, tuple(served.anatomy.grid_size)
    chosen = sorted({layer % 3 for layer in layers}) if layers is not None else [0, 1, 2]
    for i, outcome in enumerate(outcomes):
        result = outcome.methods[0]
        assert result.layer_indices == tuple(chosen)
        per_layer = [fuse(attentions[layer][i], head_fusion) for layer in chosen]
        expected_layers = np.stack([m[0, prefix:].reshape(grid) for m in per_layer])
        assert result.layers[0].shape == (len(chosen), *grid)
        np.testing.assert_allclose(result.layers[0].numpy(), expected_layers, atol=1e-6)
        if aggregate == "rollout":
            product = np.eye(per_layer[0].shape[0])
            for matrix in per_layer:
                product = residual(matrix) @ product
            expected = product[0, prefix:].reshape(grid)
        else:
            expected = {"mean": np.mean, "max": np.max, "min": np.min}[aggregate](expected_layers, axis=0)
        np.testing.assert_allclose(result.maps[0].numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("variant", ["vit", "deit_distilled", "registers_nonsquare"])
def test_token_mean_is_the_mean_over_all_rows(variant: str) -> None:
    served = served_model(*VIT_VARIANTS[variant], seed=13)
    pixels = random_pixels(served, 2, seed=13)
    attentions = attentions_of(served, pixels)
    prefix, grid = served.anatomy.num_prefix_tokens, served.anatomy.grid_size
    outcomes = explain_direct(served, pixels, [
        {"name": "raw_attention", "params": {"token": "mean", "head_fusion": "max", "layer": 1}},
        {"name": "rollout", "params": {"token": "mean", "discard_ratio": 0.5, "start_layer": 1}},
        {"name": "raw_attention", "params": {"token": "cls", "layer": 1}},
    ])
    for i, outcome in enumerate(outcomes):
        raw = fuse(attentions[1][i], "max")
        np.testing.assert_allclose(outcome.methods[0].maps[0].numpy(), raw.mean(axis=0)[prefix:].reshape(grid),
                                   atol=1e-6)
        product = np.eye(raw.shape[0])
        for attention in attentions[1:]:
            product = residual(discard_plainly(fuse(attention[i], "mean"), 0.5, prefix)) @ product
        np.testing.assert_allclose(outcome.methods[1].maps[0].numpy(),
                                   product.mean(axis=0)[prefix:].reshape(grid), atol=1e-6)
        assert not np.allclose(outcome.methods[0].maps[0].numpy(), outcome.methods[2].maps[0].numpy())


def test_models_without_a_class_token_take_token_mean_and_reject_class_rows() -> None:
    served = served_model(*NO_CLASS_TOKEN, seed=14)
    assert not served.anatomy.has_class_token and served.anatomy.num_prefix_tokens == 0
    pixels = random_pixels(served, 2, seed=14)
    attentions = attentions_of(served, pixels)
    outcomes = explain_direct(served, pixels, [{"name": "raw_attention", "params": {"token": "mean"}},
                                               {"name": "rollout", "params": {"token": "mean"}}])
    for i, outcome in enumerate(outcomes):
        expected = attentions[-1][i].mean(axis=0).mean(axis=0).reshape(served.anatomy.grid_size)
        np.testing.assert_allclose(outcome.methods[0].maps[0].numpy(), expected, atol=1e-6)
        assert outcome.methods[1].maps[0].shape == tuple(served.anatomy.grid_size)
    for spec in ["raw_attention", "rollout", "attention_layers", "grad_rollout", "gae", "norm_attention",
                 "attention_flow", "value_zeroing", {"name": "rollout", "params": {"token": "cls"}}]:
        spec = spec if isinstance(spec, str) else MethodSpec(**spec)
        with pytest.raises(MethodRequestError) as error:
            resolve_methods([spec], "vit", served.anatomy)
        assert "class token" in str(error.value)


@pytest.mark.parametrize(("params", "field"), [({"layers": [3]}, "params.layers[0]"), ({"layers": []}, "layers"),
                                               ({"aggregate": "median"}, "aggregate")])
def test_attention_layers_rejects_bad_params(params, field) -> None:
    served = served_model(*VIT_VARIANTS["vit"])
    with pytest.raises(MethodRequestError) as error:
        resolve_methods([MethodSpec(name="attention_layers", params=params)], "vit", served.anatomy)
    assert field in str(error.value)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_attention_layers_over_http_returns_renderable_layer_maps(anyio_backend) -> None:
    settings = settings_for(tiny_vit_config())
    async with running_app(settings) as (client, _):
        response = await client.post(
            "/v1/models/tiny_vit/explain", files={"file": ("x.png", png_bytes(random_image(31)), "image/png")},
            data={"methods": '[{"name": "attention_layers", "params": {"layers": [-1, 0], "aggregate": "rollout"}}]',
                  "output": '{"format": ["raw", "heatmap_png"], "space": "tokens"}'})
        assert response.status_code == 200, response.text
        result = response.json()["explanations"][0]
        assert result["params"] == {"layers": [-1, 0], "head_fusion": "mean", "aggregate": "rollout"}
        (explained,) = result["results"]
        layers = explained["layers"]
        assert [layer["layer"] for layer in layers] == [0, 1]  # depth order, negative indices resolved
        for layer in layers:
            assert (layer["width"], layer["height"]) == (4, 4)
            assert base64.b64decode(layer["heatmap_png"]).startswith(b"\x89PNG")
            raw = np.frombuffer(base64.b64decode(layer["raw"]["data"]), dtype="<f4").reshape(layer["raw"]["shape"])
            assert raw.shape == (4, 4) and np.isfinite(raw).all()
            assert {"min", "max", "entropy", "top10_mass", "peak"} <= set(layer["statistics"])
        first, last = (np.frombuffer(base64.b64decode(layer["raw"]["data"]), dtype="<f4") for layer in layers)
        assert not np.allclose(first, last)
        # other methods have no per-layer maps
        response = await client.post(
            "/v1/models/tiny_vit/explain", files={"file": ("x.png", png_bytes(random_image(31)), "image/png")},
            data={"methods": '["rollout"]'})
        assert response.json()["explanations"][0]["results"][0]["layers"] is None
