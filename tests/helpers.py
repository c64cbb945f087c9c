"""Shared test helpers: tiny random models, a running app with an in-process HTTP client, test images."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from typing import Any, AsyncIterator, Iterator

import httpx
import numpy as np
from fastapi import FastAPI
from PIL import Image

from service.http.app import create_app, load_models
from service.config import ModelConfig, ServerSettings
from service.model.served import ServedModel

# A ViT small enough for CPU tests: 32x32 input, 8x8 patches (a 4x4 grid), 2 blocks.
TINY_VIT_KWARGS: dict[str, Any] = {
    "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10,
}


def tiny_vit_config(model_id: str = "tiny_vit", **overrides: Any) -> ModelConfig:
    fields: dict[str, Any] = {
        "id": model_id, "architecture": "vit_tiny_patch16_224", "weights": "random",
        "model_kwargs": dict(TINY_VIT_KWARGS), "max_batch_size": 8, "max_wait_ms": 20.0,
    }
    fields.update(overrides)
    return ModelConfig(**fields)


def tiny_cnn_config(model_id: str = "tiny_cnn", **overrides: Any) -> ModelConfig:
    fields: dict[str, Any] = {
        "id": model_id, "architecture": "test_resnet", "weights": "random",
        "model_kwargs": {"num_classes": 10}, "max_batch_size": 8, "max_wait_ms": 20.0,
    }
    fields.update(overrides)
    return ModelConfig(**fields)


def settings_for(*configs: ModelConfig, **overrides: Any) -> ServerSettings:
    return ServerSettings(models=list(configs), **overrides)


@asynccontextmanager
async def running_app(
    settings: ServerSettings, models: dict[str, ServedModel] | None = None, wait_ready: bool = True
) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    """Start the app's lifespan and yield an HTTP client talking to it in-process."""
    app = create_app(settings, models=models if models is not None else load_models(settings))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            if wait_ready:
                for _ in range(600):
                    if (await client.get("/readyz")).status_code == 200:
                        break
                    await asyncio.sleep(0.01)
                else:
                    raise TimeoutError("app never became ready")
            yield client, app


def png_bytes(image: Image.Image | np.ndarray, fmt: str = "PNG", **save_kwargs: Any) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


def random_image(seed: int, size: tuple[int, int] = (48, 40)) -> np.ndarray:
    """A distinct RGB image (height, width, 3) per seed."""
    return np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)


@contextmanager
def uvicorn_in_thread(app: Any, **config: Any) -> Iterator[str]:
    """The app behind a real uvicorn server on 127.0.0.1 (a free port unless `config` says otherwise), run in a
    daemon thread; yields its base URL and stops it on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, **{"host": "127.0.0.1", "port": 0, "log_level": "warning", **config}))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(6000):  # models injected: start-up takes seconds at most
            if server.started:
                break
            time.sleep(0.01)
        else:
            raise TimeoutError("uvicorn never started")
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
