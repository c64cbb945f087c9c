"""The response bodies, built from what the stages computed: routes read the request, run the stages and return one
of these."""

from __future__ import annotations

import time

import torch
from PIL import Image

from api_schemas import (
    BatchingInfo,
    ClassScore,
    CropBox,
    ExplainResponse,
    LayerMap,
    MapStatistics,
    MethodInfo,
    MethodResult,
    ModelInfo,
    PredictResponse,
    TargetExplanation,
    Timings,
    WeightsInfo,
)
from service.explain.pipeline import ExplainOutcome, MethodRequest
from service.explain.registry import CostContext, ExplainMethod
from service.explain.render.geometry import CropGeometry
from service.explain.render.maps import RenderOptions, render_map
from service.model.anatomy import ModelAnatomy
from service.model.served import ServedModel
from service.runtime.batching import BatchedResult, lane_batch_cap


def class_score(index: int, probabilities: torch.Tensor, labels: list[str]) -> ClassScore:
    return ClassScore(index=index, label=labels[index], probability=float(probabilities[index]))


def top_classes(probabilities: torch.Tensor, labels: list[str], k: int) -> list[ClassScore]:
    values, indices = probabilities.topk(min(k, probabilities.numel()))
    return [
        ClassScore(index=int(i), label=labels[int(i)], probability=float(v))
        for v, i in zip(values.tolist(), indices.tolist())
    ]


def timings(result: BatchedResult, received_at: float) -> Timings:
    """The batch's queue and compute times, and the request's total so far."""
    return Timings(
        queue_ms=result.queue_ms,
        compute_ms=result.compute_ms,
        total_ms=(time.perf_counter() - received_at) * 1000.0,
        batch_size=result.batch_size,
    )


def weights_info(served: ServedModel) -> WeightsInfo:
    return WeightsInfo(source=served.weights.source, random=served.weights.random, note=served.weights.note)


def model_info(served: ServedModel) -> ModelInfo:
    cfg = served.config
    return ModelInfo(
        id=served.id,
        architecture=served.architecture,
        family=served.family,
        weights=weights_info(served),
        input_size=list(served.input_size),
        num_classes=served.num_classes,
        device=str(served.device),
        dtype=str(served.dtype).removeprefix("torch."),
        ready=served.ready,
        batching=BatchingInfo(
            max_batch_size=cfg.max_batch_size, lanes=len(served.copies),
            batch_cap=lane_batch_cap(cfg.max_batch_size, len(served.copies)), max_wait_ms=cfg.max_wait_ms,
            queue_size=cfg.queue_size, timeout_s=cfg.timeout_s,
        ),
        preprocessing={k: list(v) if isinstance(v, tuple) else v for k, v in served.data_config.items()},
    )


# The reference model of MethodInfo.reference_cost: deit_tiny_patch16_224 as analyse_model describes it.
REFERENCE_CHANNELS = 192
REFERENCE_CONTEXT = CostContext(
    anatomy=ModelAnatomy(
        family="vit", attention_modules=tuple(f"blocks.{i}.attn" for i in range(12)), num_prefix_tokens=1,
        has_class_token=True, grid_size=(14, 14), feature_layer="blocks.11.norm1",
        module_names=frozenset(f"blocks.{i}.{part}" for i in range(12) for part in ("attn", "norm1")),
    ),
    targets=1,
    layer_channels=lambda name: REFERENCE_CHANNELS,
)


def method_info(method: ExplainMethod) -> MethodInfo:
    return MethodInfo(
        name=method.name,
        description=method.description,
        families=list(method.families),
        class_specific=method.class_specific,
        params_schema=method.params_model.model_json_schema(),
        relative_cost=method.relative_cost,
        cost_note=method.cost_note,
        cost_formula=method.method_cost.formula,
        reference_cost=round(method.estimate_cost(method.params_model(), REFERENCE_CONTEXT).units, 3),
    )


def predict_response(
    served: ServedModel, result: BatchedResult[torch.Tensor], top_k: int, received_at: float
) -> PredictResponse:
    """`result` is a PredictJob's: the image's class probabilities."""
    return PredictResponse(
        model_id=served.id,
        weights=weights_info(served),
        predictions=top_classes(result.value, served.labels, top_k),
        timings=timings(result, received_at),
    )


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
                target=None if target is None else class_score(target, outcome.probabilities, labels),
                map=rendered,
                layers=layer_maps,
            ))
        results.append(MethodResult(
            method=request.method.name, params=request.params.model_dump(), class_specific=class_specific,
            compute_ms=maps.compute_ms, results=explained,
        ))
    return results


def explain_response(
    served: ServedModel,
    result: BatchedResult[ExplainOutcome],
    explanations: list[MethodResult],
    image: Image.Image,
    geometry: CropGeometry,
    options: RenderOptions,
    top_k: int,
    received_at: float,
) -> ExplainResponse:
    """`result` is an ExplainJob's; `explanations` its maps, rendered."""
    outcome = result.value
    left, top, right, bottom = geometry.box
    return ExplainResponse(
        model_id=served.id,
        weights=weights_info(served),
        predictions=top_classes(outcome.probabilities, served.labels, top_k),
        original_size=list(image.size),
        crop_box=CropBox(left=left, top=top, right=right, bottom=bottom),
        space=options.space,  # type: ignore[arg-type]
        explanations=explanations,
        timings=timings(result, received_at),
    )
