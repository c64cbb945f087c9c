"""The slowest requests the default budgets still admit, timed through the real app on the default models (random
weights where the hub is unreachable), one lane: `python -m benchmarks.worst_case`.

Each case sits just under its model's `max_request_cost`; the printed compute time is what one request can hold a
lane for. Run it on an otherwise idle machine; with both CPU lanes busy each request gets half the threads.
"""

from __future__ import annotations

import asyncio
import io
import json
import time

import httpx
import numpy as np
from PIL import Image

from service.config import load_settings
from service.http.app import create_app, load_models

# Per model: method lists just under the packaged budgets (service/default_config.toml).
CASES = {
    "efficientnet_lite0": [[{"name": "integrated_gradients", "params": {"steps": 25}}],
                           [{"name": "smoothgrad", "params": {"samples": 24}}]],
    "deit_tiny_patch16_224": [[{"name": "integrated_gradients", "params": {"steps": 39}}],
                              [{"name": "smoothgrad", "params": {"samples": 38}}],
                              [{"name": "value_zeroing", "params": {"aggregate": "rollout", "layer": 5}}],
                              [{"name": "attention_flow", "params": {"discard_ratio": 0.17}}]],
    "resnet50": [[{"name": "integrated_gradients", "params": {"steps": 15}}],
                 [{"name": "smoothgrad", "params": {"samples": 15}}]],
}


def photo() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


async def main() -> None:
    settings = load_settings(cpu_workers=1)
    for model in settings.models:
        if model.weights == "hub":
            model.weights = "random"  # the hub is not needed to time the work
    print("budgets:", {m.id: settings.request_cost_limit(m) for m in settings.models})
    app = create_app(settings, models=load_models(settings))
    image = photo()
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x", timeout=600) as client:
            while (await client.get("/readyz")).status_code != 200:
                await asyncio.sleep(0.1)
            for model, cases in CASES.items():
                for methods in cases:
                    started = time.perf_counter()
                    response = await client.post(f"/v1/models/{model}/explain", files={"file": ("x.png", image)},
                                                 data={"methods": json.dumps(methods)})
                    body = response.json()
                    detail = (f"compute {body['timings']['compute_ms'] / 1000:.2f} s" if response.status_code == 200
                              else body["error"]["message"])
                    print(f"{model} {json.dumps(methods)}: {response.status_code} in "
                          f"{time.perf_counter() - started:.2f} s, {detail}")


if __name__ == "__main__":
    asyncio.run(main())
