"""Classification (`POST /v1/models/{model_id}/predict`)."""

from __future__ import annotations

import time

import torch
from fastapi import APIRouter, Depends, Request

from api_schemas import ClassScore, PredictJsonRequest, PredictOptions, PredictResponse, Timings
from service.runtime.batching import BatchedResult
from service.http.dependencies import get_ready_model, get_state
from service.http.errors import error_responses
from service.http.uploads import read_image_request
from service.runtime.processor import PredictJob
from service.http.openapi import image_request_body
from service.http.errors import submit_or_raise
from service.http.routes.models import weights_info
from service.model.served import ServedModel
from service.http.state import ServiceState

router = APIRouter(tags=["inference"])


def top_classes(probabilities: torch.Tensor, labels: list[str], k: int) -> list[ClassScore]:
    values, indices = probabilities.topk(min(k, probabilities.numel()))
    return [
        ClassScore(index=int(i), label=labels[int(i)], probability=float(v))
        for v, i in zip(values.tolist(), indices.tolist())
    ]


def timings(result: BatchedResult, received_at: float) -> Timings:
    return Timings(
        queue_ms=result.queue_ms,
        compute_ms=result.compute_ms,
        total_ms=(time.perf_counter() - received_at) * 1000.0,
        batch_size=result.batch_size,
    )


@router.post(
    "/v1/models/{model_id}/predict",
    response_model=PredictResponse,
    summary="Classify one image",
    description="Send the image as a multipart upload (`file`, plus optional `top_k`) or as JSON with a base64 "
    "`image`. Requests from all clients are batched per model.",
    responses=error_responses(400, 404, 413, 415, 422, 500, 503, 504),
    openapi_extra=image_request_body(PredictJsonRequest, PredictOptions),
)
async def predict(
    request: Request,
    served: ServedModel = Depends(get_ready_model),
    state: ServiceState = Depends(get_state),
) -> PredictResponse:
    received_at = time.perf_counter()
    body = await read_image_request(request, PredictOptions, PredictJsonRequest, state.settings.max_body_bytes)
    _, pixels = await state.decode_and_preprocess(served, body.image)
    result = await submit_or_raise(state.queues[served.id], PredictJob(pixels))
    response = PredictResponse(
        model_id=served.id,
        weights=weights_info(served),
        predictions=top_classes(result.value, served.labels, body.options.top_k),
        timings=timings(result, received_at),
    )
    state.metrics.latency.labels(served.id, "predict").observe(time.perf_counter() - received_at)
    return response
