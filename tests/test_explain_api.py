"""/v1/methods and /v1/models/{id}/explain over HTTP: validation, shared work, batching, concurrency."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from service.explain.targets import TargetRequest
from service.http.uploads import decode_image
from tests.explain_helpers import explain_direct
from tests.helpers import load_models, png_bytes, random_image, running_app, settings_for, tiny_cnn_config, tiny_vit_config

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def app_client():
    # vit_pair and vit_trio form a batch exactly when 2 or 3 requests have arrived, however slow the machine is
    # (one lane: with two, each batch would take at most half the cap; tests/test_device_lanes.py covers lanes).
    settings = settings_for(
        tiny_vit_config(max_wait_ms=20.0), tiny_cnn_config(),
        tiny_vit_config("vit_pair", max_batch_size=2, max_wait_ms=10_000.0, dispatch_when_idle=False),
        tiny_vit_config("vit_trio", max_batch_size=3, max_wait_ms=10_000.0, dispatch_when_idle=False),
        cpu_workers=1,
    )
    models = load_models(settings)
    async with running_app(settings, models) as (client, _):
        yield client, models


def raw_array(raw: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(raw["data"]), dtype="<f4").reshape(raw["shape"])


async def explain(client, data: bytes, model: str = "tiny_vit", **options):
    fields = {k: v if isinstance(v, str) else json.dumps(v) for k, v in options.items()}
    return await client.post(f"/v1/models/{model}/explain", files={"file": ("x.png", data, "image/png")},
                             data=fields)


async def test_methods_catalogue(app_client) -> None:
    client, _ = app_client
    methods = {m["name"]: m for m in (await client.get("/v1/methods")).json()["methods"]}
    assert {"raw_attention", "rollout", "gradcam"} <= set(methods)
    assert methods["rollout"]["families"] == ["vit"] and methods["rollout"]["class_specific"] is False
    assert methods["gradcam"]["families"] == ["vit", "cnn"] and methods["gradcam"]["class_specific"] is True
    discard = methods["rollout"]["params_schema"]["properties"]["discard_ratio"]
    assert discard["default"] == 0.0 and discard["minimum"] == 0.0 and discard["exclusiveMaximum"] == 1.0
    assert methods["raw_attention"]["params_schema"]["properties"]["head_fusion"]["enum"] == ["mean", "max", "min"]
    assert all(m["description"] and m["relative_cost"] > 0 for m in methods.values())


async def test_explain_response_maps_and_raw_values_equal_the_pipeline(app_client) -> None:
    client, models = app_client
    served = models["tiny_vit"]
    data = png_bytes(random_image(5, size=(60, 40)))
    response = await explain(client, data, methods=["rollout", {"name": "gradcam"}],
                             target={"top_k": 2}, output={"format": ["raw", "heatmap_png", "gray_png",
                                                                     "overlay_png"], "space": "tokens"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["original_size"] == [60, 40] and body["space"] == "tokens"
    pixels = served.preprocess(decode_image(data, 10**8)).unsqueeze(0)
    direct = explain_direct(served, pixels, ["rollout", "gradcam"], target=TargetRequest(top_k=2))[0]
    rollout, gradcam = body["explanations"]
    assert rollout["method"] == "rollout" and rollout["params"] == {"head_fusion": "mean", "discard_ratio": 0.0,
                                                                    "start_layer": 0, "token": "cls"}
    assert len(rollout["results"]) == 1 and rollout["results"][0]["target"] is None
    np.testing.assert_allclose(raw_array(rollout["results"][0]["map"]["raw"]), direct.methods[0].maps[0].numpy(),
                               atol=1e-5)
    assert [r["target"]["index"] for r in gradcam["results"]] == direct.targets
    assert [p["index"] for p in body["predictions"][:2]] == direct.targets
    for result, expected in zip(gradcam["results"], direct.methods[1].maps):
        rendered = result["map"]
        np.testing.assert_allclose(raw_array(rendered["raw"]), expected.numpy(), atol=1e-5)
        assert (rendered["width"], rendered["height"]) == (4, 4)
        for fmt in ("heatmap_png", "gray_png", "overlay_png"):
            assert Image.open(io.BytesIO(base64.b64decode(rendered[fmt]))).size == (4, 4)
        statistics = rendered["statistics"]
        assert {"min", "max", "entropy", "top10_mass", "peak"} <= set(statistics)
        assert statistics.get("completeness_gap") is None  # only integrated gradients reports one


async def test_original_space_map_has_the_original_size_and_crop_box(app_client) -> None:
    client, models = app_client
    response = await explain(client, png_bytes(random_image(6, size=(90, 60))), methods=["raw_attention"],
                             output={"format": ["raw"]})
    body = response.json()
    rendered = body["explanations"][0]["results"][0]["map"]
    assert (rendered["width"], rendered["height"]) == (90, 60)
    # crop_pct 0.9: 90x60 -> resized 52x35 (shorter side to floor(32 / 0.9) = 35), centre crop 32x32 at (10, 2)
    assert models["tiny_vit"].data_config["crop_pct"] == 0.9
    sx, sy = 52 / 90, 35 / 60
    box = body["crop_box"]
    expected = {"left": 10 / sx, "top": 2 / sy, "right": 42 / sx, "bottom": 34 / sy}
    assert box == pytest.approx(expected, abs=1e-6)
    values = raw_array(rendered["raw"])
    outside = np.ones((60, 90), dtype=bool)
    outside[4:58, 18:72] = False  # pixel centres certainly inside the box
    inside_core = ~outside
    assert np.isnan(values[:, :17]).all() and np.isnan(values[:, 73:]).all()
    assert np.isnan(values[:3, :]).all() and np.isnan(values[59:, :]).all()
    assert not np.isnan(values[inside_core]).any()


async def test_several_methods_share_one_forward_pass(app_client) -> None:
    client, models = app_client
    calls = []
    handle = models["tiny_vit"].active_network.register_forward_hook(lambda *_: calls.append(1))
    try:
        response = await explain(client, png_bytes(random_image(1)), methods=["raw_attention", "rollout", "gradcam"])
    finally:
        handle.remove()
    assert response.status_code == 200 and len(calls) == 1


async def test_concurrent_requests_with_different_targets_get_their_own_maps(app_client) -> None:
    client, models = app_client
    served = models["vit_pair"]
    data = [png_bytes(random_image(seed)) for seed in (11, 12)]
    responses = await asyncio.gather(*(explain(client, d, model="vit_pair", methods=["gradcam"], target=t,
                                               output={"format": ["raw"], "space": "tokens"})
                                       for d, t in zip(data, (3, 8))))
    for d, target, response in zip(data, (3, 8), responses):
        body = response.json()
        assert body["timings"]["batch_size"] == 2
        result = body["explanations"][0]["results"][0]
        assert result["target"]["index"] == target
        pixels = served.preprocess(decode_image(d, 10**8)).unsqueeze(0)
        expected = explain_direct(served, pixels, ["gradcam"], target=TargetRequest(index=target))[0]
        np.testing.assert_allclose(raw_array(result["map"]["raw"]), expected.methods[0].maps[0].numpy(), atol=1e-5)


async def test_gradcam_on_a_cnn_and_labels_as_targets(app_client) -> None:
    client, _ = app_client
    response = await explain(client, png_bytes(random_image(2)), model="tiny_cnn", methods=["gradcam"],
                             target="class_4", output={"format": ["raw"], "space": "input"})
    assert response.status_code == 200, response.text
    result = response.json()["explanations"][0]["results"][0]
    assert result["target"]["index"] == 4 and result["map"]["raw"]["shape"] == [160, 160]


@pytest.mark.parametrize(("model", "options", "field"), [
    ("tiny_vit", {"methods": ["nope"]}, "methods[0].name: unknown method 'nope'"),
    ("tiny_vit", {"methods": ["rollout", {"name": "rollout", "params": {"discard_ratio": 1.5}}]},
     "methods[1].params.discard_ratio"),
    ("tiny_vit", {"methods": [{"name": "rollout", "params": {"bogus": 1}}]}, "methods[0].params.bogus"),
    ("tiny_vit", {"methods": [{"name": "raw_attention", "params": {"layer": 7}}]}, "params.layer"),
    ("tiny_vit", {"methods": [{"name": "gradcam", "params": {"target_layer": "blocks.99"}}]},
     "params.target_layer"),
    ("tiny_cnn", {"methods": ["rollout"]}, "does not apply to cnn models"),
    ("tiny_vit", {"methods": ["rollout", "cam"]}, "methods[1] (cam): CAM needs"),
    ("tiny_vit", {"methods": [{"name": "attention_layers", "params": {"layers": []}}]}, "methods[0].params.layers"),
    ("tiny_vit", {"methods": ["rollout"], "target": 10}, "target: class index 10 is out of range"),
    ("tiny_vit", {"methods": ["rollout"], "target": -1}, "target: class index -1 is out of range"),
    ("tiny_vit", {"methods": ["rollout"], "target": "zebra"}, "target: unknown label 'zebra'"),
    ("tiny_vit", {"methods": ["rollout"], "target": {"top_k": 0}}, "target"),
    ("tiny_vit", {"methods": ["rollout"], "output": {"colormap": "nonesuch"}}, "nonesuch"),
    ("tiny_vit", {"methods": ["rollout"], "output": {"format": ["jpeg"]}}, "output.format"),
    ("tiny_vit", {"methods": ["rollout"], "output": {"space": "moon"}}, "output.space"),
    ("tiny_vit", {"methods": []}, "methods"),
])
async def test_invalid_requests_get_422_naming_the_field(app_client, model, options, field) -> None:
    client, _ = app_client
    response = await explain(client, png_bytes(random_image(0)), model=model, **options)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and field in error["message"], error


async def test_json_body_explain(app_client) -> None:
    client, _ = app_client
    payload = {"image": base64.b64encode(png_bytes(random_image(3))).decode(), "methods": ["raw_attention"],
               "target": 2, "output": {"format": ["gray_png"], "space": "input"}}
    response = await client.post("/v1/models/tiny_vit/explain", json=payload)
    assert response.status_code == 200, response.text
    rendered = response.json()["explanations"][0]["results"][0]["map"]
    assert Image.open(io.BytesIO(base64.b64decode(rendered["gray_png"]))).size == (32, 32)


async def test_predict_and_explain_requests_batched_together_both_stay_correct(app_client) -> None:
    client, models = app_client
    served = models["vit_trio"]
    data = [png_bytes(random_image(seed)) for seed in (21, 22, 23)]
    predict, explained, predict_again = await asyncio.gather(
        client.post("/v1/models/vit_trio/predict", files={"file": ("a.png", data[0])}, data={"top_k": "10"}),
        explain(client, data[1], model="vit_trio", methods=["rollout"], output={"format": ["raw"], "space": "tokens"}),
        client.post("/v1/models/vit_trio/predict", files={"file": ("c.png", data[2])}, data={"top_k": "10"}),
    )
    assert predict.json()["timings"]["batch_size"] == 3 == explained.json()["timings"]["batch_size"]
    for response, image in ((predict, data[0]), (predict_again, data[2])):
        pixels = served.preprocess(decode_image(image, 10**8)).unsqueeze(0)
        with torch.no_grad():
            expected = served.active_network(pixels).softmax(-1)[0]
        got = {p["index"]: p["probability"] for p in response.json()["predictions"]}
        np.testing.assert_allclose([got[i] for i in range(10)], expected.numpy(), atol=1e-6)
    pixels = served.preprocess(decode_image(data[1], 10**8)).unsqueeze(0)
    direct = explain_direct(served, pixels, ["rollout"])[0]
    np.testing.assert_allclose(raw_array(explained.json()["explanations"][0]["results"][0]["map"]["raw"]),
                               direct.methods[0].maps[0].numpy(), atol=1e-5)
    assert all(block.attn.fused_attn for block in served.active_network.blocks)
