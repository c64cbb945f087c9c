"""Saliency maps (`POST /v1/models/{model_id}/explain`)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from api_schemas import ExplainJsonRequest, ExplainOptions, ExplainResponse
from service.explain.pipeline import ExplainJob, MethodRequest
from service.explain.render.geometry import UnsupportedTransformError, crop_geometry
from service.explain.registry import CostContext
from service.explain.render.maps import RenderOptions, canvas_size, render_options
from service.explain.requests import (
    BudgetError,
    MethodRequestError,
    check_request_cost,
    check_response_bytes,
    map_count,
    module_channels,
    request_cost,
    resolve_methods,
)
from service.explain.targets import TargetError, TargetRequest, parse_target
from service.http.dependencies import get_ready_model, get_state
from service.http.errors import ApiError, error_responses, invalid_request, submit_or_raise
from service.http.openapi import image_request_body
from service.http.responses import build_explanations, explain_response
from service.http.observation import observe_batched
from service.http.state import ServiceState
from service.http.tracing import span
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


def _over_budget(exc: BudgetError) -> ApiError:
    return ApiError(422, "over_budget", str(exc))


def _within_budget(
    requests: tuple[MethodRequest, ...], target: TargetRequest, rendering: RenderOptions, evaluate: tuple[str, ...],
    served: ServedModel, state: ServiceState,
) -> int:
    """422 over_budget when the methods' estimated cost exceeds the model's max_request_cost, or when maps of a
    size known before decoding (`input` and `tokens` space) could exceed max_response_bytes. Returns the number of
    maps the response will hold."""
    targets = 1 if target.index is not None else (target.top_k or 1)
    context = CostContext(anatomy=served.anatomy, targets=targets, layer_channels=module_channels(served.network))
    cost = request_cost(requests, context, evaluate)
    maps = map_count(cost, requests, targets)
    try:
        check_request_cost(cost, state.settings.request_cost_limit(served.config))
        if rendering.space != "original":  # tokens-space maps are at most the input's size
            _, height, width = served.input_size
            check_response_bytes(maps, rendering.formats, (width, height), state.settings.max_response_bytes)
    except BudgetError as exc:
        raise _over_budget(exc) from None
    return maps


@router.post(
    "/v1/models/{model_id}/explain",
    response_model=ExplainResponse,
    summary="Explain one image with one or more methods",
    description="Send the image as a multipart upload (`file`, plus option fields; `methods`, `target` and "
    "`output` as JSON text) or as JSON with a base64 `image`. Several methods share one forward pass; requests "
    "from all clients are batched per model. See GET /v1/methods for the methods, their params and how their cost "
    "is estimated: a request estimated above the model's max_request_cost, or whose response could exceed "
    "max_response_bytes, gets 422 over_budget before any work is queued.",
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
    evaluate = tuple(dict.fromkeys(body.options.evaluate))
    maps = _within_budget(requests, target, rendering, evaluate, served, state)  # before decoding: no work if refused
    image, pixels = await state.decode_and_preprocess(served, body.image)
    if rendering.space == "original":  # the map size depends on the image's
        try:
            check_response_bytes(maps, rendering.formats, canvas_size(image.size, rendering.max_side),
                                 state.settings.max_response_bytes)
        except BudgetError as exc:
            raise _over_budget(exc) from None
    try:
        geometry = crop_geometry(served.transform, image.size)
    except UnsupportedTransformError as exc:
        raise ApiError(500, "unsupported_preprocessing", str(exc)) from None
    result = await submit_or_raise(state.queues[served.id], ExplainJob(pixels, requests, target, evaluate), request)
    with span("render", **{"saliency.model": served.id, "saliency.maps": maps}):
        explanations = await state.off_loop(
            build_explanations, result.value, requests, served.labels, geometry, image, rendering
        )
    observe_batched(result, tuple(r.method.name for r in requests))
    state.observe_explanations(served, result.value, explanations)
    return explain_response(served, result, explanations, image, geometry, rendering, body.options.top_k, received_at)
