"""Classification (`POST /v1/models/{model_id}/predict`)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from api_schemas import PredictJsonRequest, PredictOptions, PredictResponse
from service.http.dependencies import get_ready_model, get_state
from service.http.errors import error_responses, submit_or_raise
from service.http.openapi import image_request_body
from service.http.responses import predict_response
from service.http.observation import observe_batched
from service.http.state import ServiceState
from service.http.uploads import read_image_request
from service.model.served import ServedModel
from service.runtime.processor import PredictJob

router = APIRouter(tags=["inference"])


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
    result = await submit_or_raise(state.queues[served.id], PredictJob(pixels), request)
    observe_batched(result)
    state.observe_prediction(served, result.value)
    return predict_response(served, result, body.options.top_k, received_at)
