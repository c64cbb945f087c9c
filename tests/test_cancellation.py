"""Abandoned work stops, and a long explanation does not starve another model's predictions.

Long work here is integrated gradients with 512 steps run one image per chunk (`explain_chunk_size = 1`) on a tiny
CNN: 512 forward and backward passes, each a chunk boundary. What the tests count is those passes (a forward hook
sees every pass that takes input gradients), so they assert the order of events, not durations.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from contextlib import asynccontextmanager
from typing import AsyncIterator

import httpx
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from torch import nn

from api_schemas import MethodSpec
from service.explain.captures import WorkAbandoned
from service.explain.pipeline import ExplainJob, ExplainOutcome, run_explain_batch
from service.explain.requests import resolve_methods
from service.explain.targets import TargetRequest
from service.http.app import create_app
from tests.explain_helpers import random_pixels
from tests.helpers import load_models, png_bytes, random_image, running_app, settings_for, tiny_cnn_config

pytestmark = pytest.mark.anyio

STEPS = 512
LONG = {"name": "integrated_gradients", "params": {"steps": STEPS, "integration": "riemann_trapezoid"}}


class GradientPasses:
    """Counts the forward passes of a module that take input gradients (the explanation's chunks, not predictions)."""

    def __init__(self, module: nn.Module) -> None:
        self.count = 0
        self.started = threading.Event()
        module.register_forward_pre_hook(self._seen)

    def _seen(self, _module: nn.Module, args: tuple) -> None:
        if args[0].requires_grad:
            self.count += 1
            if self.count >= 3:  # the recording pass, then the chunks
                self.started.set()


def long_model_config(model_id: str = "slow", **overrides):
    return tiny_cnn_config(model_id, explain_chunk_size=1, max_batch_size=1, max_wait_ms=0.0,
                           max_request_cost=1e9, **overrides)


def explain_body(*methods: dict) -> dict:
    return {"image": base64.b64encode(png_bytes(random_image(5))).decode(), "methods": list(methods),
            "output": {"format": ["raw"]}}


def predict_body() -> dict:
    return {"image": base64.b64encode(png_bytes(random_image(6))).decode()}


async def test_an_explanation_that_times_out_gets_504_and_stops_at_its_next_chunk() -> None:
    settings = settings_for(long_model_config(timeout_s=0.4), cpu_workers=1)
    models = load_models(settings)
    passes = GradientPasses(models["slow"].network)
    async with running_app(settings, models) as (client, _):
        response = await client.post("/v1/models/slow/explain", json=explain_body(LONG))
        assert response.status_code == 504, response.text
        at_timeout = passes.count
        # Queued behind the explanation on the only lane (its own model: not lent): answered once it stopped.
        predicted = await client.post("/v1/models/slow/predict", json=predict_body())
        assert predicted.status_code == 200, predicted.text
        after = passes.count
    assert 3 <= at_timeout < STEPS
    assert after - at_timeout <= 2  # the chunk in flight, and one more at most


@asynccontextmanager
async def served_on_loopback(settings, models) -> AsyncIterator[tuple[str, FastAPI]]:
    """The app behind a real uvicorn server on 127.0.0.1 (disconnects reach the app as uvicorn reports them)."""
    app = create_app(settings, models=models)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    task = asyncio.ensure_future(server.serve())
    try:
        for _ in range(1000):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        assert server.started, "uvicorn did not start"
        port = server.servers[0].sockets[0].getsockname()[1]
        base_url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            for _ in range(3000):
                if (await client.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.01)
            else:
                raise TimeoutError("the server never became ready")
        yield base_url, app
    finally:
        server.should_exit = True
        await task


@pytest.mark.parametrize(("body_timeout_s", "disconnect_after_s"), [(60.0, 0.0), (0.3, 0.6)],
                         ids=["at_once", "after_the_body_deadline"])
async def test_an_explanation_whose_client_disconnects_stops_at_its_next_chunk(
    body_timeout_s: float, disconnect_after_s: float
) -> None:
    """Also once the body deadline (which applies to receiving the body, not to waiting for the answer) has passed."""
    settings = settings_for(long_model_config(), cpu_workers=1, body_timeout_s=body_timeout_s)
    models = load_models(settings)
    passes = GradientPasses(models["slow"].network)
    async with served_on_loopback(settings, models) as (base_url, app):
        port = int(base_url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = json.dumps(explain_body(LONG)).encode()
        writer.write(b"POST /v1/models/slow/explain HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        assert await asyncio.to_thread(passes.started.wait, 30)
        await asyncio.sleep(disconnect_after_s)
        writer.close()  # the client goes away mid-explanation
        await writer.wait_closed()
        closed = app.state.service.metrics.requests.labels("slow", "explain", "499", "client_closed_request")
        for _ in range(3000):  # until the server has seen the disconnect and answered nobody
            if closed._value.get() == 1:
                break
            await asyncio.sleep(0.001)
        assert closed._value.get() == 1
        at_disconnect = passes.count
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            predicted = await client.post("/v1/models/slow/predict", json=predict_body())
        assert predicted.status_code == 200, predicted.text
        after = passes.count
    assert at_disconnect < STEPS
    assert after - at_disconnect <= 2


async def test_a_long_explanation_does_not_hold_back_another_models_prediction_on_the_same_lane() -> None:
    settings = settings_for(long_model_config(), tiny_cnn_config("other", max_wait_ms=0.0), cpu_workers=1)
    models = load_models(settings)
    passes = GradientPasses(models["slow"].network)
    async with running_app(settings, models) as (client, _):
        explaining = asyncio.ensure_future(client.post("/v1/models/slow/explain", json=explain_body(LONG)))
        assert await asyncio.to_thread(passes.started.wait, 30)
        predicted = await client.post("/v1/models/other/predict", json=predict_body())
        assert predicted.status_code == 200, predicted.text
        at_prediction = passes.count
        for _ in range(3000):  # the explanation goes on after the prediction was answered
            if passes.count > at_prediction or explaining.done():
                break
            await asyncio.sleep(0.01)
        assert not explaining.done() and passes.count > at_prediction
        explaining.cancel()  # this client leaves: the rest is not computed
        await asyncio.gather(explaining, return_exceptions=True)


class Abandons:
    """The running batch as the pipeline sees it: job `index` is abandoned at the `after`-th checkpoint."""

    def __init__(self, index: int, after: int) -> None:
        self.index, self.after, self.checkpoints = index, after, 0
        self.abandoned: set[int] = set()

    def wanted(self, index: int) -> bool:
        return index not in self.abandoned

    def checkpoint(self) -> None:
        self.checkpoints += 1
        if self.checkpoints == self.after:
            self.abandoned.add(self.index)


def test_a_method_pass_nobody_waits_for_stops_and_its_batch_mates_get_their_maps() -> None:
    served = load_models(settings_for(tiny_cnn_config()))["tiny_cnn"]
    passes = GradientPasses(served.network)
    pixels = random_pixels(served, 2)

    def job(i: int, method: dict) -> ExplainJob:
        return ExplainJob(pixels[i], resolve_methods([MethodSpec(**method)], served.family, served.anatomy),
                          TargetRequest(top_k=1))

    smooth = {"name": "smoothgrad", "params": {"samples": 64}}
    jobs = [job(0, {"name": "saliency"}), job(1, smooth)]
    solo = run_explain_batch(served, jobs[:1], chunk_size=4)[0]
    before = passes.count
    # Checkpoints: saliency's pass (1), smoothgrad's pass (2), then one before each of its 16 chunks of 4 (3, 4,
    # 5, ...). Job 1 is abandoned at the 5th, just after that chunk was checked: it runs, the 4th chunk does not.
    outcomes = run_explain_batch(served, jobs, Abandons(1, after=5), chunk_size=4)
    assert isinstance(outcomes[1], WorkAbandoned)
    assert isinstance(outcomes[0], ExplainOutcome)
    torch.testing.assert_close(outcomes[0].methods[0].maps[0], solo.methods[0].maps[0])
    assert passes.count - before == 1 + 3  # the recording pass and 3 of smoothgrad's 16 chunks
