"""Activation-maximisation jobs: the objective rises, progress, cancellation, interleaving with /predict, limits,
validation, eviction, shutdown and the OpenAPI document."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn

from service.http.app import create_app
from service.http.uploads import decode_image
from service.model.served import ServedModel
from service.visualization.jobs import JobsClosedError
from service.visualization.optimizer import gaussian_blur, total_variation
from tests.helpers import (
    load_models,
    png_bytes,
    random_image,
    running_app,
    settings_for,
    tiny_cnn_config,
    tiny_vit_config,
)

pytestmark = pytest.mark.anyio

CLASS_3 = {"type": "class", "index": 3}
LONG = 10_000  # steps of a job that only ends by cancellation
LONG_BUDGET = {"max_job_cost": 3.0 * LONG}  # a model config admitting LONG jobs at the input size


async def start_job(client, body: dict[str, Any], model: str = "tiny_vit"):
    return await client.post(f"/v1/models/{model}/visualizations", json=body)


async def wait_job(client, job_id: str, until, timeout: float = 20.0) -> dict[str, Any]:
    """Poll GET /v1/jobs/{id} until `until(status)` holds."""
    deadline = time.perf_counter() + timeout
    while True:
        response = await client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        status = response.json()
        if until(status):
            return status
        assert time.perf_counter() < deadline, f"job never reached the expected state: {status['status']}"
        await asyncio.sleep(0.01)


def finished(status: dict[str, Any]) -> bool:
    return status["status"] not in ("queued", "running")


def decode_png(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def normalised(served: ServedModel, image: Image.Image) -> torch.Tensor:
    """The PNG's pixels in the model's normalised input space, (1, C, H, W)."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    mean = torch.tensor(served.data_config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(served.data_config["std"]).view(1, -1, 1, 1)
    return (pixels - mean) / std


def assert_rises(curve: list[float], initial: float, final: float) -> None:
    quarter = len(curve) // 4
    first, last = float(np.mean(curve[:quarter])), float(np.mean(curve[-quarter:]))
    assert final > initial + 0.05, (initial, final)
    assert last > first + 0.05, (first, last)
    assert initial == curve[0]


async def test_class_objective_rises_and_the_png_is_the_optimised_image() -> None:
    settings = settings_for(tiny_vit_config())
    models = load_models(settings)
    served = models["tiny_vit"]
    weights_before = {k: v.clone() for k, v in served.active_network.state_dict().items()}
    async with running_app(settings, models) as (client, _):
        response = await start_job(client, {"objective": CLASS_3, "steps": 40, "jitter": 1, "lr": 0.05})
        assert response.status_code == 202, response.text
        created = response.json()
        assert response.headers["location"] == f"/v1/jobs/{created['id']}"
        assert created["status"] in ("queued", "running") and created["result"] is None
        assert created["progress"]["total"] == 40 and created["kind"] == "activation_maximization"
        assert created["params"]["size"] == [32, 32] and created["params"]["tv_weight"] == 0.01
        status = await wait_job(client, created["id"], finished)
    assert status["status"] == "succeeded", status
    assert status["progress"] == {"step": 40, "total": 40, "objective": status["result"]["objective_curve"][-1]}
    assert status["started_at"] and status["finished_at"] and status["error"] is None
    result = status["result"]
    curve = result["objective_curve"]
    assert len(curve) == 40
    assert_rises(curve, result["initial_objective"], result["final_objective"])
    image = decode_png(result["image_png"])
    assert image.size == (32, 32) == (result["width"], result["height"]) and image.mode == "RGB"
    # The returned image really scores what the job reports (up to 8-bit quantisation of the PNG).
    with torch.no_grad():
        logit = float(served.active_network(normalised(served, image))[0, 3])
    assert logit == pytest.approx(result["final_objective"], abs=0.03)
    # Only the image was optimised: the model's weights are untouched and hold no gradients.
    for name, value in served.active_network.state_dict().items():
        assert torch.equal(value, weights_before[name]), name
    assert all(p.grad is None and not p.requires_grad for p in served.active_network.parameters())


async def test_channel_objective_rises_at_a_requested_size() -> None:
    settings = settings_for(tiny_cnn_config(warmup_batch_sizes=[1]))
    # Fixed random weights: unseeded, they depended on which tests ran before, and for some draws (seeds 4 and 5)
    # this channel rises by less than assert_rises' 0.05 within 24 steps, with the old blur and the new alike.
    torch.manual_seed(0)
    models = load_models(settings)
    served = models["tiny_cnn"]
    objective = {"type": "channel", "layer": "layer2.0.conv1", "channel": 5}
    async with running_app(settings, models) as (client, _):
        response = await start_job(
            client, {"objective": objective, "steps": 24, "lr": 0.1, "size": [48, 64], "blur_every": 8}, "tiny_cnn"
        )
        assert response.status_code == 202, response.text
        status = await wait_job(client, response.json()["id"], finished)
    assert status["status"] == "succeeded", status
    result = status["result"]
    assert_rises(result["objective_curve"], result["initial_objective"], result["final_objective"])
    image = decode_png(result["image_png"])
    assert image.size == (64, 48) and (result["width"], result["height"]) == (64, 48)
    captured: list[torch.Tensor] = []
    layer = dict(served.active_network.named_modules())["layer2.0.conv1"]
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        served.active_network(normalised(served, image))
    handle.remove()
    assert float(captured[0][0, 5].mean()) == pytest.approx(result["final_objective"], abs=0.03)


async def test_progress_advances_and_cancel_stops_the_job() -> None:
    settings = settings_for(tiny_vit_config(**LONG_BUDGET))
    models = load_models(settings)
    forwards = [0]
    models["tiny_vit"].active_network.register_forward_pre_hook(lambda _m, _i: forwards.__setitem__(0, forwards[0] + 1))
    async with running_app(settings, models) as (client, _):
        job_id = (await start_job(client, {"objective": CLASS_3, "steps": LONG})).json()["id"]
        early = await wait_job(client, job_id, lambda s: s["progress"]["step"] >= 2)
        assert early["status"] == "running" and early["started_at"] is not None
        assert early["progress"]["objective"] is not None and early["progress"]["total"] == LONG
        later = await wait_job(client, job_id, lambda s: s["progress"]["step"] >= early["progress"]["step"] + 3)
        cancelled = await client.delete(f"/v1/jobs/{job_id}")
        assert cancelled.status_code == 200
        body = cancelled.json()
        assert body["status"] == "cancelled" and body["finished_at"] and body["result"] is None
        stopped_at = body["progress"]["step"]
        assert stopped_at >= later["progress"]["step"]
        await asyncio.sleep(0.1)  # a step already running on the worker thread may finish
        forwards_after_cancel = forwards[0]
        await asyncio.sleep(0.3)
        assert forwards[0] == forwards_after_cancel  # the model no longer runs for the job
        after = (await client.get(f"/v1/jobs/{job_id}")).json()
        listing = (await client.get("/v1/jobs")).json()["jobs"]
        # A second DELETE forgets the finished job.
        forgotten = await client.delete(f"/v1/jobs/{job_id}")
        gone = await client.get(f"/v1/jobs/{job_id}")
    assert after["status"] == "cancelled" and after["progress"]["step"] == stopped_at
    assert [j["id"] for j in listing] == [job_id] and listing[0]["status"] == "cancelled"
    assert forgotten.status_code == 200 and forgotten.json()["status"] == "cancelled"
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "job_not_found"


async def test_predict_is_served_promptly_while_a_long_job_runs() -> None:
    settings = settings_for(tiny_vit_config(max_wait_ms=5.0, **LONG_BUDGET))
    models = load_models(settings)
    served = models["tiny_vit"]
    images = [png_bytes(random_image(seed)) for seed in range(6)]
    with torch.no_grad():
        expected = [
            served.active_network(served.preprocess(decode_image(d, settings.max_image_pixels))[None]).softmax(-1)[0]
            for d in images
        ]
    threads: set[str] = set()
    served.active_network.register_forward_pre_hook(lambda _m, _i: threads.add(threading.current_thread().name))
    async with running_app(settings, models) as (client, _):
        job_id = (await start_job(client, {"objective": CLASS_3, "steps": LONG})).json()["id"]
        before = await wait_job(client, job_id, lambda s: s["progress"]["step"] >= 2)
        latencies = []
        for data, want in zip(images, expected):
            started = time.perf_counter()
            # A job that held the device for its whole run would block this for minutes.
            response = await asyncio.wait_for(
                client.post("/v1/models/tiny_vit/predict", files={"file": ("x.png", data, "image/png")},
                            data={"top_k": "10"}),
                timeout=10,
            )
            latencies.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
            got = torch.zeros(10)
            for p in response.json()["predictions"]:
                got[p["index"]] = p["probability"]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        after = (await client.get(f"/v1/jobs/{job_id}")).json()
        await client.delete(f"/v1/jobs/{job_id}")
    assert after["status"] == "running"
    assert after["progress"]["step"] > before["progress"]["step"]  # the job kept going between the predictions
    assert max(latencies) < 3.0, latencies
    assert threads and all(name.startswith("device-") for name in threads), threads


async def test_job_limit_gives_429_until_a_job_ends() -> None:
    async with running_app(settings_for(tiny_vit_config(**LONG_BUDGET), max_jobs=2)) as (client, _):
        first = await start_job(client, {"objective": CLASS_3, "steps": LONG})
        second = await start_job(client, {"objective": CLASS_3, "steps": LONG, "seed": 1})
        refused = await start_job(client, {"objective": CLASS_3, "steps": 5})
        await client.delete(f"/v1/jobs/{first.json()['id']}")
        accepted = await start_job(client, {"objective": CLASS_3, "steps": 5})
        listing = (await client.get("/v1/jobs")).json()["jobs"]
    assert first.status_code == second.status_code == 202
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "too_many_jobs" and refused.headers["retry-after"]
    assert "2" in refused.json()["error"]["message"]
    assert accepted.status_code == 202
    assert len(listing) == 3 and all(j["result"] is None for j in listing)


INVALID_REQUESTS = [  # model, body, the field the message names, a fragment of the message
    ("tiny_vit", {"objective": {"type": "layer", "layer": "blocks.9"}}, "objective.layer", "no module"),
    ("tiny_cnn", {"objective": {"type": "channel", "layer": "layer2.0.conv1", "channel": 48}},
     "objective.channel", "48 channels"),
    ("tiny_vit", {"objective": {"type": "channel", "layer": "blocks.1.mlp.fc1", "channel": 128}},
     "objective.channel", "128 channels"),
    ("tiny_vit", {"objective": {"type": "class", "index": 10}}, "objective.index", "out of range 0..9"),
    ("tiny_vit", {"objective": {"type": "token", "layer": "blocks.1", "token": 17}}, "objective.token",
     "17 tokens"),
    ("tiny_cnn", {"objective": {"type": "token", "layer": "layer1", "token": 0}}, "objective.layer",
     "not (batch, tokens, features)"),
    ("tiny_vit", {"objective": CLASS_3, "size": [48, 48]}, "size", "48x48"),
    ("tiny_vit", {"objective": CLASS_3, "steps": 0}, "steps", "greater than or equal to 1"),
    ("tiny_vit", {"objective": CLASS_3, "size": [32]}, "size", "at least 2"),
    ("tiny_vit", {"objective": {"type": "neuron", "layer": "head"}}, "objective", "tag"),
    ("tiny_vit", {"objective": CLASS_3, "lr": 0.1, "momentum": 0.9}, "momentum", "Extra inputs"),
    ("tiny_vit", {"steps": 4}, "objective", "Field required"),
]


async def test_invalid_requests_get_422_naming_the_field() -> None:
    settings = settings_for(tiny_vit_config(), tiny_cnn_config(warmup_batch_sizes=[1]))
    async with running_app(settings) as (client, _):
        for model, body, field, fragment in INVALID_REQUESTS:
            response = await start_job(client, body, model)
            assert response.status_code == 422, (body, response.text)
            error = response.json()["error"]
            assert error["code"] == "invalid_request", body
            assert field in error["message"] and fragment in error["message"], (body, error["message"])
        listing = (await client.get("/v1/jobs")).json()["jobs"]
    assert listing == []  # nothing was created


async def test_unknown_job_and_unknown_model() -> None:
    async with running_app(settings_for(tiny_vit_config())) as (client, _):
        get = await client.get("/v1/jobs/nope")
        delete = await client.delete("/v1/jobs/nope")
        model = await start_job(client, {"objective": CLASS_3}, "not-served")
    assert get.status_code == delete.status_code == 404
    assert get.json()["error"]["code"] == delete.json()["error"]["code"] == "job_not_found"
    assert model.status_code == 404 and model.json()["error"]["code"] == "model_not_found"


async def test_same_seed_same_result_other_seed_other_result() -> None:
    body = {"objective": {"type": "token", "layer": "blocks.1", "token": 0}, "steps": 6, "jitter": 2}
    async with running_app(settings_for(tiny_vit_config())) as (client, _):
        ids = [(await start_job(client, {**body, "seed": seed})).json()["id"] for seed in (7, 7, 8)]
        results = [(await wait_job(client, i, finished))["result"] for i in ids]
    assert results[0]["objective_curve"] == results[1]["objective_curve"]
    assert results[0]["image_png"] == results[1]["image_png"]
    assert results[0]["objective_curve"] != results[2]["objective_curve"]


async def test_finished_jobs_beyond_the_bound_are_evicted() -> None:
    async with running_app(settings_for(tiny_vit_config(), max_finished_jobs=1)) as (client, _):
        first = (await start_job(client, {"objective": CLASS_3, "steps": 2})).json()["id"]
        await wait_job(client, first, finished)
        second = (await start_job(client, {"objective": CLASS_3, "steps": 2})).json()["id"]
        await wait_job(client, second, finished)
        evicted = await client.get(f"/v1/jobs/{first}")
    assert evicted.status_code == 404


class ExplodingUnderGrad(nn.Module):
    """Serves predictions normally but fails whenever gradients are enabled (as a job's steps are)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.num_classes = inner.num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("boom under grad")
        return self.inner(x)


async def test_a_failing_step_fails_the_job_and_not_the_server() -> None:
    settings = settings_for(tiny_vit_config())
    models = load_models(settings)
    models["tiny_vit"].network = ExplodingUnderGrad(models["tiny_vit"].network)
    async with running_app(settings, models) as (client, _):
        job_id = (await start_job(client, {"objective": CLASS_3, "steps": 5})).json()["id"]
        status = await wait_job(client, job_id, finished)
        predict = await client.post("/v1/models/tiny_vit/predict",
                                    files={"file": ("x.png", png_bytes(random_image(1)), "image/png")})
    assert status["status"] == "failed" and status["result"] is None
    assert status["error"]["code"] == "visualization_failed" and "boom under grad" in status["error"]["message"]
    assert predict.status_code == 200


async def test_shutdown_cancels_running_jobs() -> None:
    async with running_app(settings_for(tiny_vit_config(**LONG_BUDGET))) as (client, app):
        jobs = app.state.service.jobs
        job_id = (await start_job(client, {"objective": CLASS_3, "steps": LONG})).json()["id"]
        await wait_job(client, job_id, lambda s: s["progress"]["step"] >= 1)
        job = jobs.get(job_id)
        started = time.perf_counter()
    assert time.perf_counter() - started < 5.0
    assert job.status == "cancelled" and job.task.done()
    with pytest.raises(JobsClosedError):
        jobs.check_capacity()


def test_blur_and_total_variation() -> None:
    constant = torch.full((1, 3, 12, 10), 0.7)
    torch.testing.assert_close(gaussian_blur(constant, 1.5), constant)
    assert float(total_variation(constant)) == 0.0
    noise = torch.randn((1, 3, 12, 10), generator=torch.Generator().manual_seed(0))
    blurred = gaussian_blur(noise, 1.0)
    assert blurred.shape == noise.shape
    assert float(total_variation(blurred)) < 0.5 * float(total_variation(noise))


def test_openapi_documents_the_job_routes() -> None:
    app = create_app(settings_for(tiny_vit_config()), models={})
    document = TestClient(app).get("/openapi.json").json()
    paths = document["paths"]
    post = paths["/v1/models/{model_id}/visualizations"]["post"]
    assert post["responses"]["202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobStatus"
    }
    for status in ("404", "422", "429", "503"):
        assert post["responses"][status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"
        }, status
    assert post["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/VisualizationRequest"
    }
    for method in ("get", "delete"):
        assert "404" in paths["/v1/jobs/{job_id}"][method]["responses"]
    assert "get" in paths["/v1/jobs"]
    request = document["components"]["schemas"]["VisualizationRequest"]
    assert request["properties"]["steps"]["default"] == 256
    assert set(request["properties"]["objective"]["discriminator"]["mapping"]) == {"class", "channel", "layer",
                                                                                    "token"}
