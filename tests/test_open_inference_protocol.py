"""The Open Inference Protocol (KServe V2 REST) through the real tritonclient against a real uvicorn: health, metadata,
inference on encoded images (JSON and binary tensor data) and on preprocessed pixels, agreeing with /predict and with
the model itself, and errors in the protocol's shape."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import struct
import threading
import time
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
import torch

from service.http.app import create_app, load_models
from service.http.uploads import decode_image
from service.model.served import ServedModel
from tests.helpers import (
    png_bytes,
    random_image,
    running_app,
    settings_for,
    tiny_cnn_config,
    tiny_vit_config,
    uvicorn_in_thread,
)

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

SETTINGS = settings_for(tiny_vit_config(), tiny_cnn_config(), device="cpu")
CLASSES = 10


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, dict[str, ServedModel]]]:
    models = load_models(SETTINGS)
    with uvicorn_in_thread(create_app(SETTINGS, models=models)) as url:
        for _ in range(600):  # warm-up runs after start-up
            if httpx.get(f"{url}/readyz").status_code == 200:
                break
            time.sleep(0.05)
        yield url, models


@pytest.fixture(scope="module")
def triton(server: tuple[str, dict[str, ServedModel]]) -> Iterator[Any]:
    client = httpclient.InferenceServerClient(url=server[0].removeprefix("http://"))
    yield client
    client.close()


def predict_all_classes(url: str, model: str, data: bytes) -> np.ndarray:
    """The probabilities of every class from our own /predict."""
    response = httpx.post(f"{url}/v1/models/{model}/predict", files={"file": ("x.png", data, "image/png")},
                          data={"top_k": str(CLASSES)}, timeout=60)
    assert response.status_code == 200, response.text
    got = np.zeros(CLASSES, dtype=np.float32)
    for p in response.json()["predictions"]:
        got[p["index"]] = p["probability"]
    return got


def bytes_input(images: list[bytes], binary: bool, shape: list[int] | None = None) -> Any:
    shape = shape or [len(images)]
    tensor = httpclient.InferInput("image", shape, "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_).reshape(shape), binary_data=True)
    else:  # JSON strings: the encoded image, base64
        encoded = [base64.b64encode(i).decode() for i in images]
        tensor.set_data_from_numpy(np.array(encoded, dtype=np.object_).reshape(shape), binary_data=False)
    return tensor


def test_health_and_server_metadata(triton: Any) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready("tiny_vit")
    assert triton.is_model_ready("tiny_vit", model_version="1")
    assert not triton.is_model_ready("no_such_model")
    metadata = triton.get_server_metadata()
    assert metadata["name"] == "saliency-server"
    assert {"binary_tensor_data", "classification"} <= set(metadata["extensions"])


def test_model_metadata(triton: Any, server: tuple[str, dict[str, ServedModel]]) -> None:
    metadata = triton.get_model_metadata("tiny_cnn")
    served = server[1]["tiny_cnn"]
    assert metadata["name"] == "tiny_cnn" and metadata["versions"] == ["1"] and metadata["platform"]
    inputs = {i["name"]: i for i in metadata["inputs"]}
    assert inputs["image"]["datatype"] == "BYTES" and inputs["image"]["shape"] == [-1]
    assert inputs["pixels"] == {**inputs["pixels"], "datatype": "FP32", "shape": [-1, *served.input_size]}
    outputs = {o["name"]: o for o in metadata["outputs"]}
    assert outputs["probabilities"]["datatype"] == "FP32" and outputs["probabilities"]["shape"] == [-1, CLASSES]
    assert outputs["top_k_indices"]["datatype"] == "INT64"


@pytest.mark.parametrize("binary", [False, True], ids=["json-base64", "binary-tensor-data"])
@pytest.mark.parametrize("model", ["tiny_vit", "tiny_cnn"])
def test_bytes_input_equals_predict(triton: Any, server: tuple[str, dict[str, ServedModel]], binary: bool,
                                    model: str) -> None:
    data = png_bytes(random_image(11))
    result = triton.infer(model, [bytes_input([data], binary)],
                          outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=binary)])
    got = result.as_numpy("probabilities")
    assert got.shape == (1, CLASSES) and got.dtype == np.float32
    np.testing.assert_allclose(got[0], predict_all_classes(server[0], model, data), atol=1e-5, rtol=0)
    assert result.get_response()["model_name"] == model


def test_fp32_pixels_equal_the_model_applied_directly(triton: Any, server: tuple[str, dict[str, ServedModel]]) -> None:
    served = server[1]["tiny_vit"]
    pixels = torch.stack([served.preprocess(decode_image(png_bytes(random_image(s)), SETTINGS.max_image_pixels))
                          for s in (1, 2)]).numpy()
    with torch.no_grad():
        expected = served.active_network(torch.from_numpy(pixels)).softmax(-1).numpy()
    for binary in (False, True):
        tensor = httpclient.InferInput("pixels", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels, binary_data=binary)
        result = triton.infer("tiny_vit", [tensor])  # no outputs named: tritonclient asks for binary outputs
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5, rtol=0)


def test_two_image_batch_with_top_k_and_classification(triton: Any,
                                                       server: tuple[str, dict[str, ServedModel]]) -> None:
    images = [png_bytes(random_image(21)), png_bytes(random_image(22))]
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name, binary in
               (("probabilities", True), ("top_k_indices", False), ("top_k_probabilities", True))]
    result = triton.infer("tiny_cnn", [bytes_input(images, binary=True, shape=[2, 1])], outputs=outputs,
                          parameters={"top_k": 3}, request_id="req-7")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (2, CLASSES)
    for row, data in zip(probabilities, images):
        np.testing.assert_allclose(row, predict_all_classes(server[0], "tiny_cnn", data), atol=1e-5, rtol=0)
    indices, top = result.as_numpy("top_k_indices"), result.as_numpy("top_k_probabilities")
    assert indices.shape == top.shape == (2, 3)
    np.testing.assert_array_equal(indices, np.argsort(-probabilities, axis=1, kind="stable")[:, :3])
    np.testing.assert_allclose(top, np.take_along_axis(probabilities, indices, axis=1), atol=1e-7)
    assert result.get_response()["id"] == "req-7"
    # Triton's classification extension: "value:index:label" strings of the top classes
    classified = triton.infer("tiny_cnn", [bytes_input(images, binary=False)],
                              outputs=[httpclient.InferRequestedOutput("probabilities", class_count=2)])
    rows = classified.as_numpy("probabilities")
    assert rows.shape == (2, 2)
    value, index, label = rows[0][0].decode().split(":")
    assert int(index) == indices[0, 0] and label == f"class_{index}"
    assert abs(float(value) - probabilities[0, indices[0, 0]]) < 1e-5


def test_gzip_request_compression(triton: Any, server: tuple[str, dict[str, ServedModel]]) -> None:
    data = png_bytes(random_image(31))
    result = triton.infer("tiny_vit", [bytes_input([data], binary=True)], request_compression_algorithm="gzip",
                          response_compression_algorithm=None)
    np.testing.assert_allclose(result.as_numpy("probabilities")[0], predict_all_classes(server[0], "tiny_vit", data),
                               atol=1e-5, rtol=0)


def test_errors_raise_inference_server_exception_with_the_message(triton: Any) -> None:
    data = png_bytes(random_image(41))
    with pytest.raises(InferenceServerException) as unknown:
        triton.infer("no_such_model", [bytes_input([data], binary=True)])
    assert "no model 'no_such_model'" in unknown.value.message() and unknown.value.status() == "404"
    with pytest.raises(InferenceServerException) as metadata:
        triton.get_model_metadata("no_such_model")
    assert "no model" in metadata.value.message()
    with pytest.raises(InferenceServerException) as not_an_image:
        triton.infer("tiny_vit", [bytes_input([b"not an image"], binary=True)])
    assert not_an_image.value.status() == "400"
    wrong = httpclient.InferInput("pixels", [1, 3, 8, 8], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3, 8, 8), dtype=np.float32))
    with pytest.raises(InferenceServerException) as wrong_shape:
        triton.infer("tiny_vit", [wrong])
    assert wrong_shape.value.status() == "400" and "[N, 3, 32, 32]" in wrong_shape.value.message()


def test_plain_http_json_shapes(server: tuple[str, dict[str, ServedModel]]) -> None:
    url = server[0]
    assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}
    ready = httpx.get(f"{url}/v2/health/ready")
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    assert httpx.get(f"{url}/v2/models/tiny_vit/ready").json() == {"ready": True}
    server_metadata = httpx.get(f"{url}/v2").json()
    assert set(server_metadata) == {"name", "version", "extensions"}
    metadata = httpx.get(f"{url}/v2/models/tiny_vit").json()
    assert set(metadata) >= {"name", "versions", "platform", "inputs", "outputs"}

    data = png_bytes(random_image(51))
    request = {"id": "a", "parameters": {"top_k": 2},
               "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                           "data": ["data:image/png;base64," + base64.b64encode(data).decode()]}]}
    response = httpx.post(f"{url}/v2/models/tiny_vit/infer", json=request, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["model_name"] == "tiny_vit" and body["model_version"] == "1" and body["id"] == "a"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert set(outputs) == {"probabilities", "top_k_indices", "top_k_probabilities"}
    assert (outputs["probabilities"]["datatype"], outputs["probabilities"]["shape"]) == ("FP32", [1, CLASSES])
    assert len(outputs["probabilities"]["data"]) == CLASSES
    assert (outputs["top_k_indices"]["datatype"], outputs["top_k_indices"]["shape"]) == ("INT64", [1, 2])
    np.testing.assert_allclose(outputs["probabilities"]["data"], predict_all_classes(url, "tiny_vit", data),
                               atol=1e-5, rtol=0)

    # the binary tensor data extension by hand: JSON, then each BYTES element behind its 4-byte LE length
    raw = struct.pack("<I", len(data)) + data
    header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    response = httpx.post(f"{url}/v2/models/tiny_vit/versions/1/infer", content=header + raw, timeout=60,
                          headers={"Inference-Header-Content-Length": str(len(header)),
                                   "Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    length = int(response.headers["Inference-Header-Content-Length"])
    answer = json.loads(response.content[:length])
    assert answer["outputs"][0]["parameters"]["binary_data_size"] == CLASSES * 4
    np.testing.assert_allclose(np.frombuffer(response.content[length:], dtype="<f4"),
                               outputs["probabilities"]["data"], atol=1e-6, rtol=0)


@pytest.mark.parametrize(("path", "body", "headers", "status"), [
    ("/v2/models/nope/infer", {"inputs": []}, {}, 404),
    ("/v2/models/tiny_vit/versions/2/infer", {"inputs": []}, {}, 404),
    ("/v2/models/tiny_vit/infer", b"{not json", {}, 400),
    ("/v2/models/tiny_vit/infer", b"[" * 100_000, {}, 400),  # nested too deeply for the parser
    ("/v2/models/tiny_vit/infer", {"inputs": "x"}, {}, 400),
    ("/v2/models/tiny_vit/infer", {"inputs": []}, {}, 400),
    ("/v2/models/tiny_vit/infer", {"inputs": [{"name": "i", "shape": [1], "datatype": "INT8", "data": [1]}]}, {}, 400),
    ("/v2/models/tiny_vit/infer", {"inputs": [{"name": "i", "shape": [2], "datatype": "BYTES", "data": ["aGk="]}]},
     {}, 400),
    ("/v2/models/tiny_vit/infer", {"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]},
     {}, 400),
    ("/v2/models/tiny_vit/infer", {"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": [5]}]}, {}, 400),
    ("/v2/models/tiny_vit/infer", {"inputs": [{"name": "i", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                               "data": [0.0]}]}, {}, 400),
    ("/v2/models/tiny_vit/infer", {"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES",
                                               "data": ["aGk="]}], "outputs": [{"name": "logits"}]}, {}, 400),
    ("/v2/models/tiny_vit/infer", {"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES",
                                               "data": ["aGk="]}], "parameters": {"top_k": 0}}, {}, 400),
    ("/v2/models/tiny_vit/infer", {"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES",
                                               "parameters": {"binary_data_size": 9}}]},
     {"Inference-Header-Content-Length": "5000"}, 400),
    ("/v2/models/tiny_vit/infer", {"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES",
                                               "data": ["aGk="]}]}, {"Content-Encoding": "gzip"}, 400),
], ids=lambda v: None)
def test_client_mistakes_get_4xx_in_the_protocol_error_shape(server: tuple[str, dict[str, ServedModel]], path: str,
                                                             body: Any, headers: dict[str, str], status: int) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(server[0] + path, content=content, timeout=60,
                          headers={"Content-Type": "application/json", **headers})
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"} and isinstance(response.json()["error"], str), response.text


def test_v2_error_shape_is_scoped_to_v2(server: tuple[str, dict[str, ServedModel]]) -> None:
    url = server[0]
    assert httpx.get(f"{url}/v2/models/nope").json() == {"error": "no model 'nope'; served models: "
                                                                  "['tiny_cnn', 'tiny_vit']"}
    assert set(httpx.get(f"{url}/v2/nothing/here").json()) == {"error"}
    assert isinstance(httpx.get(f"{url}/v2/nothing/here").json()["error"], str)
    ours = httpx.get(f"{url}/v1/models/nope").json()
    assert set(ours["error"]) == {"code", "message", "request_id"}
    # answered by the middleware before the app: still the protocol's shape under /v2
    too_long = httpx.get(f"{url}/v2/models/{'x' * 9000}")
    assert too_long.status_code == 414 and isinstance(too_long.json()["error"], str)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:  # a declared body over max_body_bytes
        sock.sendall(b"POST /v2/models/tiny_vit/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 10000000000\r\n\r\n{}")
        head, _, body = sock.recv(65536).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and isinstance(json.loads(body)["error"], str)


@pytest.mark.anyio
async def test_warming_up_answers_503_then_infer_works_in_process() -> None:
    """Before warm-up: not ready and infer 503 in the protocol's shape; after: a 3-image JSON request through the
    in-process transport (each image its own queue item) gives one row per image."""
    settings = settings_for(tiny_vit_config(), cpu_workers=1)
    models = load_models(settings)
    served = models["tiny_vit"]
    release = threading.Event()
    original_warm_up = served.warm_up

    def slow_warm_up(*args: object) -> None:
        release.wait(30)
        original_warm_up(*args)

    served.warm_up = slow_warm_up  # type: ignore[method-assign]
    images = [base64.b64encode(png_bytes(random_image(s))).decode() for s in (61, 62, 63)]
    request = {"inputs": [{"name": "image", "shape": [3, 1], "datatype": "BYTES", "data": [[i] for i in images]}]}
    async with running_app(settings, models, wait_ready=False) as (client, _):
        live = await client.get("/v2/health/live")
        server_ready = await client.get("/v2/health/ready")
        model_ready = await client.get("/v2/models/tiny_vit/ready")
        early = await client.post("/v2/models/tiny_vit/infer", json=request)
        release.set()
        for _ in range(500):
            if (await client.get("/v2/health/ready")).status_code == 200:
                break
            await asyncio.sleep(0.01)
        late = await client.post("/v2/models/tiny_vit/infer", json=request)
    assert live.status_code == 200
    assert (server_ready.status_code, server_ready.json()) == (503, {"ready": False})
    assert (model_ready.status_code, model_ready.json()) == (503, {"ready": False})
    assert early.status_code == 503 and "warming up" in early.json()["error"]
    assert late.status_code == 200, late.text
    probabilities = late.json()["outputs"][0]
    assert probabilities["shape"] == [3, CLASSES] and len(probabilities["data"]) == 3 * CLASSES
