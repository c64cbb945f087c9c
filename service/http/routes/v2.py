"""The Open Inference Protocol (KServe V2 REST), beside our own API, so tritonclient, KServe and MLServer clients work.

Health, server and model metadata, model readiness and `POST /v2/models/{name}/infer`. An infer request carries one
input: encoded images as a BYTES tensor (shape [N] or [N, 1]; base64 strings in JSON, or raw with the binary tensor
data extension) or preprocessed pixels as an FP32 tensor [N, C, H, W]. Each image is its own item of the model's
batch queue, so the images batch with other clients' requests, /predict's included. Errors are `{"error": message}`.

The routes are left out of the OpenAPI document: the protocol has its own specification (KServe's
`open_inference_rest.yaml`), an infer body may be JSON followed by raw bytes, which OpenAPI cannot describe, and the
error shape differs from the rest of the API.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import struct
import zlib
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from api_schemas import (
    V2InferRequest,
    V2LiveResponse,
    V2ModelMetadata,
    V2ReadyResponse,
    V2RequestInput,
    V2ServerMetadata,
)
from api_schemas.errors import validation_message
from service import __version__
from service.http.dependencies import get_state, ready_model, served_model
from service.http.errors import V2Error, submit_or_raise
from service.http.responses import (
    V2_EXTENSIONS,
    V2_MODEL_VERSION,
    V2Outputs,
    v2_infer_body,
    v2_model_metadata,
)
from service.http.observation import observe_batched
from service.http.state import ServiceState
from service.model.served import ServedModel
from service.runtime.processor import PredictJob

router = APIRouter(tags=["open inference protocol"], include_in_schema=False)

HEADER_LENGTH = "inference-header-content-length"


def _check_version(name: str, version: str | None) -> None:
    if version not in (None, "", V2_MODEL_VERSION):
        raise V2Error(404, f"model {name!r} has no version {version!r}; versions: [{V2_MODEL_VERSION!r}]")


# The model look-ups are /v1's: their ApiErrors are answered in the protocol's shape under /v2 (service/http/app.py).
def _model(state: ServiceState, name: str, version: str | None) -> ServedModel:
    served = served_model(state, name)
    _check_version(name, version)
    return served


def _ready_model(state: ServiceState, name: str, version: str | None) -> ServedModel:
    _model(state, name, version)
    return ready_model(state, name)


@router.get("/v2/health/live")
async def v2_live() -> V2LiveResponse:
    return V2LiveResponse(live=True)


@router.get("/v2/health/ready")
async def v2_ready(state: ServiceState = Depends(get_state)) -> JSONResponse:
    return JSONResponse(V2ReadyResponse(ready=state.ready).model_dump(), status_code=200 if state.ready else 503)


@router.get("/v2")
async def v2_server_metadata() -> V2ServerMetadata:
    return V2ServerMetadata(name="saliency-server", version=__version__, extensions=list(V2_EXTENSIONS))


@router.get("/v2/models/{name}")
@router.get("/v2/models/{name}/versions/{version}")
async def v2_model_metadata_route(name: str, version: str | None = None,
                                  state: ServiceState = Depends(get_state)) -> V2ModelMetadata:
    return v2_model_metadata(_model(state, name, version))


@router.get("/v2/models/{name}/ready")
@router.get("/v2/models/{name}/versions/{version}/ready")
async def v2_model_ready(name: str, version: str | None = None,
                         state: ServiceState = Depends(get_state)) -> JSONResponse:
    served = _model(state, name, version)
    ready = served.ready and served.failure is None
    return JSONResponse(V2ReadyResponse(ready=ready).model_dump(), status_code=200 if ready else 503)


@router.post("/v2/models/{name}/infer")
@router.post("/v2/models/{name}/versions/{version}/infer")
async def v2_infer(request: Request, name: str, version: str | None = None,
                   state: ServiceState = Depends(get_state)) -> Response:
    served = _ready_model(state, name, version)
    body = _decompress(await request.body(), request.headers.get("content-encoding"), state.settings.max_body_bytes)
    infer, binary = _parse_body(body, request.headers.get(HEADER_LENGTH))
    if len(infer.inputs) != 1:
        raise V2Error(400, f"expected exactly one input (BYTES encoded images or FP32 [N, C, H, W] pixels), "
                           f"got {len(infer.inputs)}")
    tensor = infer.inputs[0]
    raw = _binary_data(tensor, binary)
    outputs = V2Outputs.from_request(infer, served.num_classes)  # 400 before any work is queued
    if tensor.datatype == "BYTES":
        images = _bytes_elements(tensor, raw)
        # decoding errors are ApiErrors, answered in the protocol's shape under /v2 (service/http/app.py)
        pixels = [p for _, p in await asyncio.gather(*(state.decode_and_preprocess(served, data) for data in images))]
    elif tensor.datatype == "FP32":
        pixels = await state.off_loop(_fp32_images, tensor, raw, served.input_size)
    else:
        dims = ", ".join(map(str, served.input_size))
        raise V2Error(400, f"input {tensor.name!r}: datatype {tensor.datatype!r} is not supported; send BYTES "
                           f"(encoded images) or FP32 (preprocessed pixels, shape [N, {dims}])")
    results = await asyncio.gather(
        *(submit_or_raise(state.queues[served.id], PredictJob(p), request) for p in pixels), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):  # an ApiError is answered in the protocol's shape, as above
            raise result
    probabilities = torch.stack([r.value for r in results]).float().numpy()  # type: ignore[union-attr]
    header, blobs = await state.off_loop(v2_infer_body, served, infer, outputs, probabilities)
    for result in results:
        state.observe_prediction(served, result.value)  # type: ignore[union-attr]
    if results:
        observe_batched(results[0])  # type: ignore[arg-type]
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})


def _decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """A body sent with `Content-Encoding: gzip` or `deflate` (tritonclient's request compression), inflated up to
    the body size limit."""
    if not encoding or encoding.strip().lower() == "identity":
        return body
    kind = encoding.strip().lower()
    if kind not in ("gzip", "deflate"):
        raise V2Error(415, f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if kind == "gzip" else zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise V2Error(400, f"the {kind} body cannot be decompressed: {exc}") from None
    if len(inflated) > limit or inflater.unconsumed_tail:
        raise V2Error(413, f"the decompressed body is larger than the limit of {limit} bytes")
    return inflated


def _parse_body(body: bytes, header_length: str | None) -> tuple[V2InferRequest, bytes]:
    """The JSON request and the binary data after it (empty without `Inference-Header-Content-Length`)."""
    if header_length is None:
        text, binary = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise V2Error(400, f"Inference-Header-Content-Length {header_length!r} is not an integer") from None
        if not 0 < length <= len(body):
            raise V2Error(400, f"Inference-Header-Content-Length {length} does not fit the body of {len(body)} bytes")
        text, binary = body[:length], body[length:]
    try:
        document = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise V2Error(400, f"the inference request is not valid JSON: {exc}") from None
    except RecursionError:  # the parser's guard against deep nesting: a client's mistake, not a 500
        raise V2Error(400, "the inference request is not usable JSON: it is nested too deeply") from None
    try:
        return V2InferRequest.model_validate(document), binary
    except ValidationError as exc:
        raise V2Error(400, f"invalid inference request: {validation_message(exc.errors())}") from None


def _binary_data(tensor: V2RequestInput, binary: bytes) -> bytes | None:
    """The input's bytes after the JSON (`parameters.binary_data_size`), which must account for all of them."""
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is None:
        if binary:
            raise V2Error(400, f"{len(binary)} bytes follow the JSON but no input has binary_data_size")
        if tensor.data is None:
            raise V2Error(400, f"input {tensor.name!r} has neither data nor parameters.binary_data_size")
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise V2Error(400, f"input {tensor.name!r}: binary_data_size must be a non-negative integer, got {size!r}")
    if size != len(binary):
        raise V2Error(400, f"input {tensor.name!r}: binary_data_size is {size} but {len(binary)} bytes follow the JSON")
    if tensor.data is not None:
        raise V2Error(400, f"input {tensor.name!r} has both data and binary_data_size")
    return binary


def _batch_size(tensor: V2RequestInput, allowed: str, ok: bool) -> int:
    if not ok or any(d < 1 for d in tensor.shape):
        raise V2Error(400, f"input {tensor.name!r}: shape {tensor.shape} is not {allowed}")
    return tensor.shape[0]


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        return [x for item in data for x in _flatten(item)]
    return [data]


def _bytes_elements(tensor: V2RequestInput, raw: bytes | None) -> list[bytes]:
    """The encoded images of a BYTES input: each element prefixed by its 4-byte little-endian length when binary,
    a base64 string (a `data:image/...;base64,` prefix accepted) in JSON."""
    shape = tensor.shape
    count = _batch_size(tensor, "[N] or [N, 1] (N encoded images)",
                        len(shape) == 1 or (len(shape) == 2 and shape[1] == 1))
    if raw is not None:
        elements, offset = [], 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise V2Error(400, f"input {tensor.name!r}: truncated length prefix at byte {offset}")
            (length,) = struct.unpack_from("<I", raw, offset)
            offset += 4
            if offset + length > len(raw):
                raise V2Error(400, f"input {tensor.name!r}: element {len(elements)} claims {length} bytes, "
                                   f"{len(raw) - offset} remain")
            elements.append(raw[offset:offset + length])
            offset += length
    else:
        strings = _flatten(tensor.data)
        elements = []
        for i, item in enumerate(strings):
            if not isinstance(item, str):
                raise V2Error(400, f"input {tensor.name!r}: element {i} is not a (base64) string")
            if item.startswith("data:") and "," in item:
                item = item.split(",", 1)[1]
            try:
                elements.append(base64.b64decode(item, validate=True))
            except (binascii.Error, ValueError):
                raise V2Error(400, f"input {tensor.name!r}: element {i} is not valid base64 (send encoded images "
                                   "base64-encoded in JSON, or raw with binary_data)") from None
    if len(elements) != count:
        raise V2Error(400, f"input {tensor.name!r}: shape {shape} says {count} elements, the data holds "
                           f"{len(elements)}")
    return elements


def _fp32_images(tensor: V2RequestInput, raw: bytes | None, input_size: tuple[int, int, int]) -> list[torch.Tensor]:
    """The images of an FP32 [N, C, H, W] input, in the model's input size, already preprocessed."""
    shape = tensor.shape
    expected = f"[N, {', '.join(map(str, input_size))}] (preprocessed pixels)"
    count = _batch_size(tensor, expected, len(shape) == 4 and tuple(shape[1:]) == tuple(input_size))
    size = count * int(np.prod(input_size))
    if raw is not None:
        if len(raw) != size * 4:
            raise V2Error(400, f"input {tensor.name!r}: shape {shape} needs {size * 4} bytes, got {len(raw)}")
        array = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    else:
        values = _flatten(tensor.data)
        if len(values) != size:
            raise V2Error(400, f"input {tensor.name!r}: shape {shape} needs {size} values, got {len(values)}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise V2Error(400, f"input {tensor.name!r}: FP32 data must be numbers")
        try:
            array = np.asarray(values, dtype=np.float32)
        except (OverflowError, ValueError):
            raise V2Error(400, f"input {tensor.name!r}: FP32 data out of range") from None
    if not np.isfinite(array).all():
        raise V2Error(400, f"input {tensor.name!r}: the pixels must be finite")
    return list(torch.from_numpy(array.reshape(count, *input_size)).unbind(0))
