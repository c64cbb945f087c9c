"""/predict end to end: correct outputs, batching across clients, back-pressure, timeouts, readiness."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from torch import nn

from service.http.uploads import decode_image
from service.model.served import ServedModel
from service.runtime.devices import default_cpu_lanes
from tests.helpers import load_models, png_bytes, random_image, running_app, settings_for, tiny_vit_config

pytestmark = pytest.mark.anyio


class GatedModule(nn.Module):
    """Wraps a model; once armed, its forward waits for a gate, and fails on (nearly) all-white images."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.num_classes = inner.num_classes
        self.gate = threading.Event()
        self.gate.set()
        self._waiting = 0
        self.calls: list[int] = []

    @property
    def waiting(self) -> bool:
        """A forward pass is blocked at the gate."""
        return self._waiting > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._waiting += 1
        self.gate.wait(30)
        self._waiting -= 1
        self.calls.append(x.shape[0])
        if (x.flatten(1).mean(1) > 0.99).any():
            raise RuntimeError("tripwire: bright image")
        return self.inner(x)


def gated_models(**config_overrides) -> tuple[dict[str, ServedModel], GatedModule]:
    settings = settings_for(tiny_vit_config(**config_overrides))
    served = load_models(settings)["tiny_vit"]
    gated = GatedModule(served.active_network)
    served.network = gated
    return {"tiny_vit": served}, gated


async def post_image(client, data: bytes, model: str = "tiny_vit", top_k: int = 3):
    return await client.post(f"/v1/models/{model}/predict", files={"file": ("x.png", data, "image/png")},
                              data={"top_k": str(top_k)})


async def test_http_predictions_equal_the_models_own_output() -> None:
    settings = settings_for(tiny_vit_config())
    models = load_models(settings)
    served = models["tiny_vit"]
    data = png_bytes(random_image(7))
    async with running_app(settings, models) as (client, _):
        response = await post_image(client, data, top_k=10)
    assert response.status_code == 200, response.text
    body = response.json()
    pixels = served.preprocess(decode_image(data, settings.max_image_pixels)).unsqueeze(0)
    with torch.no_grad():
        expected = served.active_network(pixels).softmax(-1)[0]
    got = torch.zeros(10)
    for p in body["predictions"]:
        got[p["index"]] = p["probability"]
        assert p["label"] == f"class_{p['index']}"
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert [p["probability"] for p in body["predictions"]] == sorted(got.tolist(), reverse=True)
    assert body["weights"] == {"source": "random", "random": True, "note": None}
    assert body["model_id"] == "tiny_vit"


async def test_concurrent_clients_get_their_own_answers_and_are_batched() -> None:
    settings = settings_for(tiny_vit_config(max_batch_size=8, max_wait_ms=1000.0))
    models = load_models(settings)
    served = models["tiny_vit"]
    images = [png_bytes(random_image(seed)) for seed in range(16)]
    expected = []
    with torch.no_grad():
        for data in images:
            pixels = served.preprocess(decode_image(data, settings.max_image_pixels)).unsqueeze(0)
            expected.append(served.active_network(pixels).softmax(-1)[0])
    async with running_app(settings, models) as (client, _):
        responses = await asyncio.gather(*(post_image(client, data, top_k=10) for data in images))
        metrics = (await client.get("/metrics")).text
    batch_sizes = []
    for response, want in zip(responses, expected):
        assert response.status_code == 200, response.text
        body = response.json()
        got = torch.zeros(10)
        for p in body["predictions"]:
            got[p["index"]] = p["probability"]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        batch_sizes.append(body["timings"]["batch_size"])
    assert max(batch_sizes) > 1, batch_sizes
    assert 'saliency_requests_total{code="",endpoint="predict",model="tiny_vit",status="200"} 16.0' in metrics


async def test_queue_full_gives_503_with_retry_after() -> None:
    models, gated = gated_models(max_batch_size=1, queue_size=2, max_wait_ms=0.0)
    async with running_app(settings_for(models["tiny_vit"].config, cpu_workers=1), models) as (client, app):
        gated.gate.clear()
        data = png_bytes(random_image(1))
        queue = app.state.service.queues["tiny_vit"]
        pending = [asyncio.ensure_future(post_image(client, data))]  # taken by the consumer, blocked in forward
        while not gated.waiting:
            await asyncio.sleep(0.01)
        pending += [asyncio.ensure_future(post_image(client, data)) for _ in range(2)]  # fill the queue
        while queue.depth < 2:
            await asyncio.sleep(0.01)
        rejected = await post_image(client, data)
        gated.gate.set()
        done = await asyncio.gather(*pending)
    assert rejected.status_code == 503
    assert rejected.headers["retry-after"] == "1"
    assert rejected.json()["error"]["code"] == "queue_full"
    assert [r.status_code for r in done] == [200, 200, 200]


async def test_request_waiting_past_its_timeout_gets_504() -> None:
    models, gated = gated_models(max_batch_size=1, timeout_s=0.3, max_wait_ms=0.0)
    async with running_app(settings_for(models["tiny_vit"].config, cpu_workers=1), models) as (client, _):
        gated.gate.clear()
        response = await post_image(client, png_bytes(random_image(2)))
        gated.gate.set()
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout"


async def test_one_bad_item_does_not_fail_its_batch_mates() -> None:
    models, gated = gated_models(max_batch_size=4, max_wait_ms=10_000.0)  # the batch forms when all 4 arrived
    async with running_app(settings_for(models["tiny_vit"].config, cpu_workers=1), models) as (client, app):
        good = [png_bytes(random_image(seed)) for seed in range(3)]
        bright = png_bytes(random_image(0) * 0 + 255)  # all white: mean 1.0 after normalisation
        # The lane is busy (a first request blocked in its forward pass), so the next four wait and form one batch.
        gated.gate.clear()
        blocker = asyncio.ensure_future(post_image(client, good[0]))
        while not gated.waiting:
            await asyncio.sleep(0.01)
        gated.calls.clear()
        pending = [asyncio.ensure_future(post_image(client, d)) for d in [good[0], bright, good[1], good[2]]]
        while app.state.service.queues["tiny_vit"].depth < 4:
            await asyncio.sleep(0.01)
        gated.gate.set()
        responses = await asyncio.gather(*pending)
        assert (await blocker).status_code == 200
    assert [r.status_code for r in responses] == [200, 500, 200, 200]
    assert responses[1].json()["error"]["code"] == "inference_failed"
    assert "tripwire" in responses[1].json()["error"]["message"]
    assert gated.calls == [1, 4, 1, 1, 1, 1]  # the blocker, the batch, then item by item


async def test_readiness_before_and_after_warm_up() -> None:
    models, _ = gated_models()
    served = models["tiny_vit"]
    release = threading.Event()
    original_warm_up = served.warm_up

    def slow_warm_up(*args: object) -> None:
        release.wait(30)
        original_warm_up(*args)

    served.warm_up = slow_warm_up  # type: ignore[method-assign]
    async with running_app(settings_for(served.config, cpu_workers=1), models, wait_ready=False) as (client, _):
        not_ready = await client.get("/readyz")
        health = await client.get("/healthz")
        early = await post_image(client, png_bytes(random_image(3)))
        listed = (await client.get("/v1/models")).json()["models"][0]
        release.set()
        for _ in range(500):
            ready = await client.get("/readyz")
            if ready.status_code == 200:
                break
            await asyncio.sleep(0.01)
        late = await post_image(client, png_bytes(random_image(3)))
    assert not_ready.status_code == 503 and not_ready.json() == {"ready": False, "models": {"tiny_vit": False}}
    assert health.status_code == 200
    assert early.status_code == 503 and early.json()["error"]["code"] == "model_warming_up"
    assert listed["ready"] is False
    assert ready.status_code == 200 and ready.json() == {"ready": True, "models": {"tiny_vit": True}}
    assert late.status_code == 200


async def test_models_endpoint_describes_each_model() -> None:
    settings = settings_for(tiny_vit_config(max_batch_size=4, queue_size=9, timeout_s=7.0))
    async with running_app(settings) as (client, _):
        listing = (await client.get("/v1/models")).json()
        one = await client.get("/v1/models/tiny_vit")
        missing = await client.get("/v1/models/nope")
    model = listing["models"][0]
    assert model == one.json()
    assert model["architecture"] == "vit_tiny_patch16_224" and model["family"] == "vit"
    assert model["weights"]["random"] is True
    assert model["input_size"] == [3, 32, 32] and model["num_classes"] == 10
    assert model["device"] == "cpu" and model["dtype"] == "float32" and model["ready"] is True
    lanes = default_cpu_lanes()
    assert model["batching"] == {"max_batch_size": 4, "lanes": lanes, "batch_cap": -(-4 // lanes),
                                 "max_wait_ms": 20.0, "queue_size": 9, "timeout_s": 7.0}
    assert model["preprocessing"]["input_size"] == [3, 32, 32]
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


async def test_a_model_whose_warm_up_fails_answers_503_model_unavailable() -> None:
    models, _ = gated_models()
    served = models["tiny_vit"]

    def broken_warm_up(*args: object) -> None:
        raise RuntimeError("out of memory")

    served.warm_up = broken_warm_up  # type: ignore[method-assign]
    async with running_app(settings_for(served.config, cpu_workers=1), models, wait_ready=False) as (client, app):
        await app.state.service.warmup_task
        ready = await client.get("/readyz")
        response = await post_image(client, png_bytes(random_image(3)))
        unknown = await post_image(client, png_bytes(random_image(3)), model="not-served")
        metrics = (await client.get("/metrics")).text
    assert ready.status_code == 503
    assert response.status_code == 503 and "retry-after" not in response.headers
    assert response.json()["error"]["code"] == "model_unavailable"
    assert "out of memory" in response.json()["error"]["message"]
    assert unknown.status_code == 404
    assert 'model="unknown"' in metrics and "not-served" not in metrics
