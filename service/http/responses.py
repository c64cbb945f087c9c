"""The response bodies, built from what the stages computed: routes read the request, run the stages and return one
of these."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from api_schemas import (
    BatchingInfo,
    ClassScore,
    CropBox,
    ExplainResponse,
    LayerMap,
    MapEvaluation,
    MapStatistics,
    MeasuredQuality,
    MethodInfo,
    MethodResult,
    MethodSelection,
    ModelInfo,
    PredictResponse,
    Preprocessing,
    TargetExplanation,
    Timings,
    V2InferRequest,
    V2InferResponse,
    V2ModelMetadata,
    V2ResponseOutput,
    V2TensorMetadata,
    WeightsInfo,
)
from service.explain.pipeline import ExplainOutcome, MethodRequest
from service.explain.quality import shipped_quality
from service.explain.registry import CostContext, ExplainMethod
from service.explain.render.geometry import CropGeometry
from service.explain.render.maps import RenderOptions, render_map
from service.model.anatomy import ModelAnatomy
from service.http.errors import V2Error
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
        preprocessing=Preprocessing(**served.data_config),
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
        measured_quality=[MeasuredQuality.model_validate(f) for f in shipped_quality()[1].get(method.name, [])],
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
        evaluations = [MapEvaluation(target=t, **scores) for t, scores in zip(maps.evaluated_targets, maps.evaluations)]
        evaluations += [None] * (len(maps.maps) - len(evaluations))
        selections = [None if d is None else MethodSelection.model_validate(d) for d in maps.details]
        selections += [None] * (len(maps.maps) - len(selections))
        for target, saliency, layers, extra, evaluation, selection in zip(
            targets, maps.maps, maps.layers, extras, evaluations, selections
        ):
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
                evaluation=evaluation,
                selection=selection,
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


# --- Open Inference Protocol (V2) -------------------------------------------------------------------------------

V2_EXTENSIONS = ("binary_tensor_data", "classification")
V2_MODEL_VERSION = "1"
V2_OUTPUTS = ("probabilities", "top_k_indices", "top_k_probabilities")
V2_DEFAULT_TOP_K = 5


def v2_model_metadata(served: ServedModel) -> V2ModelMetadata:
    """The model's V2 metadata: one input of either kind (encoded images or pixels) and its outputs."""
    return V2ModelMetadata(
        name=served.id,
        versions=[V2_MODEL_VERSION],
        platform="pytorch_timm",
        inputs=[
            V2TensorMetadata(name="image", datatype="BYTES", shape=[-1],
                             parameters={"description": "encoded images (PNG, JPEG...), one per element; "
                                         "send this input or `pixels`"}),
            V2TensorMetadata(name="pixels", datatype="FP32", shape=[-1, *served.input_size],
                             parameters={"description": "images already preprocessed with the model's transform, "
                                         "NCHW; send this input or `image`"}),
        ],
        outputs=[
            V2TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, served.num_classes]),
            V2TensorMetadata(name="top_k_indices", datatype="INT64", shape=[-1, -1],
                             parameters={"description": "with the request parameter top_k (default 5)"}),
            V2TensorMetadata(name="top_k_probabilities", datatype="FP32", shape=[-1, -1],
                             parameters={"description": "with the request parameter top_k (default 5)"}),
        ],
        parameters={"architecture": served.architecture, "family": served.family,
                    "weights": served.weights.source, "random_weights": served.weights.random},
    )


@dataclass(frozen=True)
class V2Output:
    name: str
    binary: bool
    classification: int | None = None


def _class_count(value: object, num_classes: int) -> bool:
    """Whether a request parameter is a number of classes: an integer (never a boolean) from 1 to `num_classes`."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= num_classes


@dataclass(frozen=True)
class V2Outputs:
    """The outputs an infer request asked for (all of them by default), checked before any work is queued."""

    outputs: tuple[V2Output, ...]
    top_k: int

    @classmethod
    def from_request(cls, request: V2InferRequest, num_classes: int) -> "V2Outputs":
        parameters = request.parameters or {}
        binary_default = parameters.get("binary_data_output", False)
        if not isinstance(binary_default, bool):
            raise V2Error(400, f"parameter binary_data_output must be a boolean, got {binary_default!r}")
        top_k = parameters.get("top_k")
        if top_k is not None and not _class_count(top_k, num_classes):
            raise V2Error(400, f"parameter top_k must be an integer from 1 to {num_classes}, got {top_k!r}")
        if request.outputs is None:
            names = ["probabilities"] + (["top_k_indices", "top_k_probabilities"] if top_k is not None else [])
            outputs = tuple(V2Output(name, binary_default) for name in names)
        else:
            chosen = []
            for requested in request.outputs:
                if requested.name not in V2_OUTPUTS:
                    raise V2Error(400, f"unknown output {requested.name!r}; outputs: {list(V2_OUTPUTS)}")
                params = requested.parameters or {}
                binary = params.get("binary_data", binary_default)
                if not isinstance(binary, bool):
                    raise V2Error(400, f"output {requested.name!r}: binary_data must be a boolean, got {binary!r}")
                classification = params.get("classification")
                if classification is not None:
                    if requested.name != "probabilities":
                        raise V2Error(400, f"output {requested.name!r}: classification applies to probabilities only")
                    if not _class_count(classification, num_classes):
                        raise V2Error(400, f"output {requested.name!r}: classification must be an integer from 1 "
                                           f"to {num_classes}, got {classification!r}")
                chosen.append(V2Output(requested.name, binary, classification))
            outputs = tuple(chosen)
        return cls(outputs, top_k if top_k is not None else min(V2_DEFAULT_TOP_K, num_classes))


def _v2_serialize_bytes(elements: list[bytes]) -> bytes:
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


def v2_infer_body(served: ServedModel, request: V2InferRequest, outputs: V2Outputs, probabilities: np.ndarray,
                  ) -> tuple[bytes, list[bytes]]:
    """The response JSON and, for outputs asked for as binary data, their bytes in order (CPU work: off the loop).
    `probabilities` is (N, classes) float32."""
    count = probabilities.shape[0]
    order = np.argsort(-probabilities, axis=1, kind="stable")
    tensors: list[V2ResponseOutput] = []
    blobs: list[bytes] = []
    for output in outputs.outputs:
        if output.classification is not None:  # Triton's classification extension: "value:index:label"
            k = output.classification
            top = order[:, :k]
            strings = [f"{probabilities[n, i]:f}:{i}:{served.labels[i]}" for n in range(count) for i in top[n]]
            datatype, shape = "BYTES", [count, k]
            array: np.ndarray | None = None
        elif output.name == "probabilities":
            datatype, shape, array = "FP32", [count, probabilities.shape[1]], probabilities.astype("<f4")
        elif output.name == "top_k_indices":
            datatype, shape, array = "INT64", [count, outputs.top_k], order[:, :outputs.top_k].astype("<i8")
        else:
            top = order[:, :outputs.top_k]
            datatype, shape = "FP32", [count, outputs.top_k]
            array = np.take_along_axis(probabilities, top, axis=1).astype("<f4")
        if output.binary:
            data = _v2_serialize_bytes([s.encode() for s in strings]) if array is None else array.tobytes()
            blobs.append(data)
            tensors.append(V2ResponseOutput(name=output.name, datatype=datatype, shape=shape,
                                            parameters={"binary_data_size": len(data)}))
        else:
            tensors.append(V2ResponseOutput(name=output.name, datatype=datatype, shape=shape,
                                            data=strings if array is None else array.reshape(-1).tolist()))
    response = V2InferResponse(model_name=served.id, model_version=V2_MODEL_VERSION, id=request.id, outputs=tensors)
    return response.model_dump_json(exclude_none=True).encode(), blobs
