"""Saliency maps (`POST /v1/models/{model_id}/explain`)."""

from __future__ import annotations

import asyncio
import time

import torch
from fastapi import APIRouter, Depends, Request
from PIL import Image

from api_schemas import (
    ClassScore,
    CropBox,
    ExplainJsonRequest,
    ExplainOptions,
    ExplainResponse,
    LayerMap,
    MapStatistics,
    MethodResult,
    TargetExplanation,
)
from service.http.dependencies import get_ready_model, get_state
from service.http.errors import ApiError, error_responses
from service.explain.render.geometry import CropGeometry, UnsupportedTransformError, crop_geometry
from service.explain.requests import resolve_methods
from service.explain.pipeline import ExplainJob, ExplainOutcome, MethodRequest
from service.explain.render.maps import RenderOptions, render_map, render_options
from service.explain.targets import TargetError, parse_target
from service.http.uploads import read_image_request
from service.http.openapi import image_request_body
from service.http.errors import submit_or_raise
from service.http.routes.models import weights_info
from service.http.routes.predict import timings, top_classes
from service.model.served import ServedModel
from service.http.state import ServiceState

router = APIRouter(tags=["explain"])


def _class_score(index: int, probabilities: torch.Tensor, labels: list[str]) -> ClassScore:
    return ClassScore(index=index, label=labels[index], probability=float(probabilities[index]))


def build_explanations(
    outcome: ExplainOutcome,
    requests: tuple[MethodRequest, ...],
    labels: list[str],
    geometry: CropGeometry,
    image: Image.Image,
    options: RenderOptions,
) -> list[MethodResult]:
    """Render every map of every method (CPU work, run off the event loop)."""
    results = []
    for request, maps in zip(requests, outcome.methods):
        class_specific = request.method.class_specific
        targets = outcome.targets if class_specific else [None]
        explained = []
        extras = maps.statistics or [None] * len(maps.maps)
        for target, saliency, layers, extra in zip(targets, maps.maps, maps.layers, extras):
            layer_maps = None
            if layers is not None:
                layer_maps = [
                    LayerMap(layer=index, **render_map(layer, geometry, image, options).model_dump())
                    for index, layer in zip(maps.layer_indices or range(len(layers)), layers)
                ]
            rendered = render_map(saliency, geometry, image, options)
            if extra:
                rendered.statistics = MapStatistics.model_validate({**rendered.statistics.model_dump(), **extra})
            explained.append(TargetExplanation(
                target=None if target is None else _class_score(target, outcome.probabilities, labels),
                map=rendered,
                layers=layer_maps,
            ))
        results.append(MethodResult(
            method=request.method.name, params=request.params.model_dump(), class_specific=class_specific,
            compute_ms=maps.compute_ms, results=explained,
        ))
    return results


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
    options = body.options
    requests = resolve_methods(options.methods, served.family, served.anatomy)
    try:
        target = parse_target(options.target, served.labels)
        rendering = render_options(options.output, state.settings.max_map_side)
    except (TargetError, ValueError) as exc:
        message = str(exc) if isinstance(exc, TargetError) else f"output: {exc}"
        raise ApiError(422, "invalid_request", message) from None
    image, pixels = await state.decode_and_preprocess(served, body.image)
    try:
        geometry = crop_geometry(served.transform, image.size)
    except UnsupportedTransformError as exc:
        raise ApiError(500, "unsupported_preprocessing", str(exc)) from None
    result = await submit_or_raise(state.queues[served.id], ExplainJob(pixels, requests, target))
    outcome: ExplainOutcome = result.value
    explanations = await asyncio.get_running_loop().run_in_executor(
        state.decode_pool, build_explanations, outcome, requests, served.labels, geometry, image, rendering
    )
    left, top, right, bottom = geometry.box
    response = ExplainResponse(
        model_id=served.id,
        weights=weights_info(served),
        predictions=top_classes(outcome.probabilities, served.labels, options.top_k),
        original_size=list(image.size),
        crop_box=CropBox(left=left, top=top, right=right, bottom=bottom),
        space=rendering.space,  # type: ignore[arg-type]
        explanations=explanations,
        timings=timings(result, received_at),
    )
    state.metrics.latency.labels(served.id, "explain").observe(time.perf_counter() - received_at)
    return response
