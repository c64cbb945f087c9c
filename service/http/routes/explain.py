"""Saliency maps (`POST /v1/models/{model_id}/explain`)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from api_schemas import ExplainJsonRequest, ExplainOptions, ExplainResponse
from service.explain.pipeline import ExplainJob, MethodRequest
from service.explain.render.geometry import UnsupportedTransformError, crop_geometry
from service.explain.render.maps import RenderOptions, render_options
from service.explain.requests import MethodRequestError, resolve_methods
from service.explain.targets import TargetError, TargetRequest, parse_target
from service.http.dependencies import get_ready_model, get_state
from service.http.errors import ApiError, error_responses, invalid_request, submit_or_raise
from service.http.openapi import image_request_body
from service.http.responses import build_explanations, explain_response
from service.http.state import ServiceState
from service.http.uploads import read_image_request
from service.model.served import ServedModel

router = APIRouter(tags=["explain"])


def _validated(
    options: ExplainOptions, served: ServedModel, max_map_side: int
) -> tuple[tuple[MethodRequest, ...], TargetRequest, RenderOptions]:
    """The requested methods, target and output checked against the model, or 422 naming the field."""
    try:
        requests = resolve_methods(options.methods, served.family, served.anatomy)
        target = parse_target(options.target, served.labels)
    except (MethodRequestError, TargetError) as exc:
        raise invalid_request(str(exc)) from None
    try:
        rendering = render_options(options.output, max_map_side)
    except ValueError as exc:
        raise invalid_request(f"output: {exc}") from None
    return requests, target, rendering


@router.post(
    "/v1/models/{model_id}/explain",
    response_model=ExplainResponse,
    summary="Explain one image with one or more methods",
    description="Send the image as a multipart upload (`file`, plus option fields; `methods`, `target` and "
    "`output` as JSON text) or as JSON with a base64 `image`. Several methods share one forward pass; requests "
    "from all clients are batched per model. See GET /v1/methods for the methods and their params.",
    responses=error_responses(400, 404, 413, 415, 422, 500, 503, 504),
    openapi_extra=image_request_body(ExplainJsonRequest, ExplainOptions),
)
async def explain(
    request: Request,
    served: ServedModel = Depends(get_ready_model),
    state: ServiceState = Depends(get_state),
) -> ExplainResponse:
    received_at = time.perf_counter()
    body = await read_image_request(request, ExplainOptions, ExplainJsonRequest, state.settings.max_body_bytes)
    requests, target, rendering = _validated(body.options, served, state.settings.max_map_side)
    image, pixels = await state.decode_and_preprocess(served, body.image)
    try:
        geometry = crop_geometry(served.transform, image.size)
    except UnsupportedTransformError as exc:
        raise ApiError(500, "unsupported_preprocessing", str(exc)) from None
    result = await submit_or_raise(state.queues[served.id], ExplainJob(pixels, requests, target))
    explanations = await state.off_loop(
        build_explanations, result.value, requests, served.labels, geometry, image, rendering
    )
    response = explain_response(served, result, explanations, image, geometry, rendering, body.options.top_k,
                                received_at)
    state.observe_latency(served.id, "explain", received_at)
    return response
