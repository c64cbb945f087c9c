"""Pydantic v2 request/response models of the saliency-server HTTP API.

This package imports neither torch nor the server, so other services can depend on it alone.
"""

from api_schemas.errors import ErrorDetail, ErrorResponse
from api_schemas.explain import (
    CropBox,
    ExplainJsonRequest,
    ExplainOptions,
    ExplainResponse,
    LayerMap,
    MapStatistics,
    MethodInfo,
    MethodListResponse,
    MethodResult,
    MethodSpec,
    OutputOptions,
    Peak,
    RawArray,
    RenderedMap,
    TargetExplanation,
    TopKTarget,
)
from api_schemas.health import HealthResponse, ReadinessResponse
from api_schemas.jobs import (
    ChannelObjective,
    ClassObjective,
    JobListResponse,
    JobProgress,
    JobStatus,
    LayerObjective,
    TokenObjective,
    VisualizationRequest,
    VisualizationResult,
)
from api_schemas.models import BatchingInfo, ModelInfo, ModelListResponse, WeightsInfo
from api_schemas.predict import ClassScore, PredictJsonRequest, PredictOptions, PredictResponse, Timings

__all__ = [
    "CropBox",
    "ExplainJsonRequest",
    "ExplainOptions",
    "ExplainResponse",
    "LayerMap",
    "MapStatistics",
    "MethodInfo",
    "MethodListResponse",
    "MethodResult",
    "MethodSpec",
    "OutputOptions",
    "Peak",
    "RawArray",
    "RenderedMap",
    "TargetExplanation",
    "TopKTarget",
    "BatchingInfo",
    "ClassScore",
    "ErrorDetail",
    "ErrorResponse",
    "HealthResponse",
    "ModelInfo",
    "ModelListResponse",
    "PredictJsonRequest",
    "PredictOptions",
    "PredictResponse",
    "ReadinessResponse",
    "Timings",
    "WeightsInfo",
    "ChannelObjective",
    "ClassObjective",
    "JobListResponse",
    "JobProgress",
    "JobStatus",
    "LayerObjective",
    "TokenObjective",
    "VisualizationRequest",
    "VisualizationResult",
]
