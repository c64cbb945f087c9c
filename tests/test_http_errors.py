"""Every error of the predict endpoint through HTTP, in the JSON envelope, plus the valid request forms."""

from __future__ import annotations

import base64
import json
from typing import Any, AsyncIterator

import httpx
import numpy as np
import pytest

from api_schemas.errors import validation_message
from tests.helpers import png_bytes, random_image, running_app, settings_for, tiny_vit_config

MAX_BODY_BYTES = 64_000
MAX_IMAGE_PIXELS = 64 * 64
PREDICT = "/v1/models/tiny_vit/predict"
LABELS = {f"class_{i}" for i in range(10)}


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def client() -> AsyncIterator[httpx.AsyncClient]:
    settings = settings_for(
        tiny_vit_config(), device="cpu", max_body_bytes=MAX_BODY_BYTES, max_image_pixels=MAX_IMAGE_PIXELS
    )
    async with running_app(settings) as (http, _):
        yield http


@pytest.fixture(scope="module")
def image() -> bytes:
    return png_bytes(random_image(7))  # 48x40 = 1920 pixels, about 6 KB


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> str:
    """Check the status and the envelope {"error": {"code", "message", "request_id"}} (the id echoed in the
    X-Request-ID header); return the message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "request_id"}, body
    assert body["error"]["request_id"] == response.headers["x-request-id"], body
    assert isinstance(body["error"]["code"], str) and body["error"]["code"]
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]["message"]


def multipart(data: bytes, **fields: str) -> dict[str, Any]:
    return {"files": {"file": ("image.png", data, "image/png")}, "data": fields}


def assert_predictions(response: httpx.Response, top_k: int) -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_id"] == "tiny_vit"
    assert body["weights"]["random"] is True
    predictions = body["predictions"]
    assert len(predictions) == top_k
    probabilities = [p["probability"] for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True)
    assert all(0.0 <= p <= 1.0 for p in probabilities)
    assert sum(probabilities) <= 1.0 + 1e-6
    assert all(p["label"] in LABELS for p in predictions)
    assert all(p["label"] == f"class_{p['index']}" for p in predictions)
    assert len({p["index"] for p in predictions}) == top_k
    assert body["timings"]["batch_size"] >= 1


# --- valid requests ---------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_multipart_with_top_k(client: httpx.AsyncClient, image: bytes) -> None:
    assert_predictions(await client.post(PREDICT, **multipart(image, top_k="3")), 3)


@pytest.mark.anyio
async def test_multipart_default_top_k_is_5(client: httpx.AsyncClient, image: bytes) -> None:
    assert_predictions(await client.post(PREDICT, **multipart(image)), 5)


@pytest.mark.anyio
async def test_json_with_data_url_prefix(client: httpx.AsyncClient, image: bytes) -> None:
    response = await client.post(PREDICT, json={"image": "data:image/png;base64," + b64(image), "top_k": 4})
    assert_predictions(response, 4)


@pytest.mark.anyio
async def test_json_and_multipart_agree(client: httpx.AsyncClient, image: bytes) -> None:
    from_json = (await client.post(PREDICT, json={"image": b64(image), "top_k": 10})).json()
    from_form = (await client.post(PREDICT, **multipart(image, top_k="10"))).json()
    assert [p["index"] for p in from_json["predictions"]] == [p["index"] for p in from_form["predictions"]]
    np.testing.assert_allclose(
        [p["probability"] for p in from_json["predictions"]],
        [p["probability"] for p in from_form["predictions"]],
        atol=1e-5,
    )
    # All ten classes: the probabilities are a distribution.
    assert sum(p["probability"] for p in from_json["predictions"]) == pytest.approx(1.0, abs=1e-4)


# --- 404 / 405 --------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_unknown_model_is_404_naming_it(client: httpx.AsyncClient, image: bytes) -> None:
    response = await client.post("/v1/models/no_such_model/predict", **multipart(image))
    message = assert_error(response, 404, "model_not_found")
    assert "no_such_model" in message
    response = await client.post("/v1/models/no_such_model/predict", json={"image": b64(image)})
    assert_error(response, 404, "model_not_found")


@pytest.mark.anyio
async def test_get_on_predict_is_405_in_the_envelope(client: httpx.AsyncClient) -> None:
    assert_error(await client.get(PREDICT), 405, "method_not_allowed")


@pytest.mark.anyio
async def test_unknown_path_is_404_in_the_envelope(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v1/nothing/here"), 404)


# --- 400: the image ---------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_not_an_image_is_400(client: httpx.AsyncClient) -> None:
    junk = np.random.default_rng(1).bytes(2000)
    assert_error(await client.post(PREDICT, **multipart(junk)), 400, "not_an_image")
    assert_error(await client.post(PREDICT, json={"image": b64(junk)}), 400, "not_an_image")


@pytest.mark.anyio
async def test_truncated_image_is_400(client: httpx.AsyncClient) -> None:
    data = png_bytes(random_image(2, (60, 60)))
    assert_error(await client.post(PREDICT, **multipart(data[: len(data) // 2])), 400, "truncated_image")


@pytest.mark.anyio
async def test_empty_file_is_400(client: httpx.AsyncClient) -> None:
    assert_error(await client.post(PREDICT, **multipart(b"")), 400, "empty_image")


@pytest.mark.anyio
async def test_invalid_base64_is_400(client: httpx.AsyncClient) -> None:
    message = assert_error(await client.post(PREDICT, json={"image": "not base64 at all!"}), 400, "invalid_base64")
    assert "image" in message


@pytest.mark.anyio
async def test_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(PREDICT, content=b'{"image": ', headers={"content-type": "application/json"})
    assert_error(response, 400, "invalid_json")


@pytest.mark.anyio
async def test_malformed_multipart_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        PREDICT, content=b"this is not multipart", headers={"content-type": "multipart/form-data; boundary=xyz"}
    )
    assert_error(response, 400)


# --- 413 --------------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_more_pixels_than_the_limit_is_413(client: httpx.AsyncClient) -> None:
    data = png_bytes(np.zeros((65, 64, 3), dtype=np.uint8))  # one row over 64x64, a tiny file
    message = assert_error(await client.post(PREDICT, **multipart(data)), 413, "image_too_large")
    assert str(MAX_IMAGE_PIXELS) in message
    at_limit = png_bytes(np.zeros((64, 64, 3), dtype=np.uint8))
    assert (await client.post(PREDICT, **multipart(at_limit))).status_code == 200


@pytest.mark.anyio
async def test_body_over_the_limit_with_content_length_is_413(client: httpx.AsyncClient, image: bytes) -> None:
    response = await client.post(PREDICT, **multipart(b"\0" * (MAX_BODY_BYTES + 1)))
    message = assert_error(response, 413, "body_too_large")
    assert str(MAX_BODY_BYTES) in message
    assert response.request.headers["content-length"] in message  # rejected from the header, size known
    big_json = json.dumps({"image": "A" * MAX_BODY_BYTES}).encode()
    response = await client.post(PREDICT, content=big_json, headers={"content-type": "application/json"})
    assert_error(response, 413, "body_too_large")
    # The server keeps serving afterwards.
    assert_predictions(await client.post(PREDICT, **multipart(image, top_k="2")), 2)


async def _chunks(total: int, size: int = 8192, prefix: bytes = b"", suffix: bytes = b"") -> AsyncIterator[bytes]:
    yield prefix
    sent = 0
    while sent < total:
        chunk = min(size, total - sent)
        yield b"A" * chunk
        sent += chunk
    yield suffix


@pytest.mark.anyio
async def test_chunked_body_over_the_limit_is_413(client: httpx.AsyncClient, image: bytes) -> None:
    response = await client.post(
        PREDICT,
        content=_chunks(MAX_BODY_BYTES + 10_000, prefix=b'{"image": "', suffix=b'"}'),
        headers={"content-type": "application/json"},
    )
    assert "content-length" not in response.request.headers
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert_error(response, 413, "body_too_large")

    prefix = (
        b'--bnd\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n"
    )
    response = await client.post(
        PREDICT,
        content=_chunks(MAX_BODY_BYTES + 10_000, prefix=prefix, suffix=b"\r\n--bnd--\r\n"),
        headers={"content-type": "multipart/form-data; boundary=bnd"},
    )
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "body_too_large")
    assert_predictions(await client.post(PREDICT, **multipart(image, top_k="2")), 2)


@pytest.mark.anyio
async def test_chunked_body_under_the_limit_is_accepted(client: httpx.AsyncClient, image: bytes) -> None:
    body = json.dumps({"image": b64(image), "top_k": 3}).encode()

    async def stream() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    response = await client.post(PREDICT, content=stream(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_predictions(response, 3)


# --- 415 / 422 --------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_unsupported_content_type_is_415(client: httpx.AsyncClient, image: bytes) -> None:
    response = await client.post(PREDICT, content=b"hello", headers={"content-type": "text/plain"})
    message = assert_error(response, 415, "unsupported_media_type")
    assert "text/plain" in message
    response = await client.post(PREDICT, content=image, headers={"content-type": "image/png"})
    assert_error(response, 415, "unsupported_media_type")


@pytest.mark.anyio
@pytest.mark.parametrize("top_k", [0, "abc", -1, 1001, 2.5])
async def test_bad_top_k_in_json_is_422_naming_top_k(client: httpx.AsyncClient, image: bytes, top_k: Any) -> None:
    message = assert_error(await client.post(PREDICT, json={"image": b64(image), "top_k": top_k}), 422,
                           "invalid_request")
    assert "top_k" in message


@pytest.mark.anyio
@pytest.mark.parametrize("top_k", ["0", "abc", "-1", "1001", ""])
async def test_bad_top_k_in_multipart_is_422_naming_top_k(client: httpx.AsyncClient, image: bytes, top_k: str) -> None:
    message = assert_error(await client.post(PREDICT, **multipart(image, top_k=top_k)), 422, "invalid_request")
    assert "top_k" in message


@pytest.mark.anyio
async def test_unknown_json_field_is_422_naming_it(client: httpx.AsyncClient, image: bytes) -> None:
    response = await client.post(PREDICT, json={"image": b64(image), "colour": "blue"})
    message = assert_error(response, 422, "invalid_request")
    assert "colour" in message


@pytest.mark.anyio
async def test_json_without_image_is_422_naming_image(client: httpx.AsyncClient) -> None:
    message = assert_error(await client.post(PREDICT, json={"top_k": 3}), 422, "invalid_request")
    assert "image" in message
    assert_error(await client.post(PREDICT, json=[1, 2, 3]), 422, "invalid_request")


@pytest.mark.anyio
async def test_multipart_without_file_is_422_naming_file(client: httpx.AsyncClient, image: bytes) -> None:
    # Only a text field.
    response = await client.post(PREDICT, files={"top_k": (None, "3")})
    assert response.request.headers["content-type"].startswith("multipart/form-data")
    message = assert_error(response, 422, "invalid_request")
    assert "file" in message
    # The image under another name.
    response = await client.post(PREDICT, files={"image": ("a.png", image, "image/png")})
    message = assert_error(response, 422, "invalid_request")
    assert "file" in message


def test_validation_message_names_each_field() -> None:
    """One wording for every validation failure: request bodies, upload options and method params."""
    errors = [{"loc": ("output", "format", 0), "msg": "bad"}, {"loc": (), "msg": "not an object"}]
    assert validation_message(errors) == "output.format.0: bad; body: not an object"
    assert validation_message(errors[:1], at="methods[1].params") == "methods[1].params.output.format.0: bad"
