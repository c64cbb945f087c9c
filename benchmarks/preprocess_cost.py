"""CPU ms per request for the per-request work outside the model: decoding the upload, the model's eval transform,
and (for /predict) encoding the JSON response. Single-threaded, as on the decode pool.

Each row shows the old path (Pillow decode, timm's transform on the PIL image) and the server's path
(`decode_image`, with libspng for plain RGB PNGs, and `ServedModel.preprocess`, with its uint8-tensor resize)
side by side.

    python -m benchmarks.preprocess_cost [--repeats 200]

Images: scikit-image's `chelsea` as a 451x300 PNG and `astronaut` resized to 640x480 as a JPEG (quality 90).
Models: the default ones' transforms (efficientnet_lite0, deit_tiny_patch16_224; random weights, never run).
Reports the median of `--repeats` runs of each step, in thread CPU time.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from typing import Callable

import numpy as np
import torch
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from PIL import Image

from api_schemas import PredictResponse
from service.config import ModelConfig, ServerSettings
from service.http import uploads
from service.http.uploads import decode_image
from service.model.served import load_served_model

MODELS = ("efficientnet_lite0", "deit_tiny_patch16_224")


def test_images() -> dict[str, bytes]:
    import skimage.data

    def encode(array: np.ndarray, fmt: str, **options: object) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, fmt, **options)
        return buffer.getvalue()

    astronaut = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((640, 480), Image.Resampling.BICUBIC))
    return {"png 451x300": encode(skimage.data.chelsea(), "PNG"), "jpeg 640x480": encode(astronaut, "JPEG", quality=90)}


def cpu_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(5):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.thread_time_ns()
        fn()
        samples.append(time.thread_time_ns() - start)
    return statistics.median(samples) / 1e6


def predict_body() -> PredictResponse:
    return PredictResponse.model_validate({
        "model_id": "deit_tiny_patch16_224",
        "weights": {"source": "random", "random": True, "note": "no weights configured"},
        "predictions": [{"index": i, "label": f"class {i}", "probability": 0.1 / (i + 1)} for i in range(5)],
        "timings": {"queue_ms": 1.25, "compute_ms": 20.5, "total_ms": 30.75, "batch_size": 4},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = test_images()
    body = predict_body()
    # FastAPI's path for a response_model: validate/serialise with pydantic, then JSONResponse (json.dumps).
    encode_ms = cpu_ms(lambda: JSONResponse(jsonable_encoder(body.model_dump(mode="json"))).body, args.repeats)
    print(f"{'model':<24} {'image':<14} {'path':<4} {'decode':>8} {'transform':>10} {'json':>6} {'total':>7}"
          "  (CPU ms/request)")
    for architecture in MODELS:
        config = ModelConfig(id=architecture, architecture=architecture, weights="random")
        served = load_served_model(config, ServerSettings(models=[config]))
        for name, data in images.items():
            old_decode = cpu_ms(lambda: pillow_decode(data), args.repeats)
            new_decode = cpu_ms(lambda: decode_image(data, 100_000_000), args.repeats)
            image = decode_image(data, 100_000_000)
            old_prep = cpu_ms(lambda: served.transform(image), args.repeats)
            new_prep = cpu_ms(lambda: served.preprocess(image), args.repeats)
            for path, decode, prep in (("old", old_decode, old_prep), ("new", new_decode, new_prep)):
                print(f"{architecture:<24} {name:<14} {path:<4} {decode:8.2f} {prep:10.2f} {encode_ms:6.3f} "
                      f"{decode + prep + encode_ms:7.2f}")


def pillow_decode(data: bytes) -> object:
    """`decode_image` with Pillow decoding every image: the path before libspng."""
    saved, uploads.spng_decode = uploads.spng_decode, None
    try:
        return decode_image(data, 100_000_000)
    finally:
        uploads.spng_decode = saved

if __name__ == "__main__":
    main()
