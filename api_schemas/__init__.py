"""Pydantic v2 request/response models of the saliency-server HTTP API.

This package imports neither torch nor the server, so other services can depend on it alone. It also ships a typed
HTTP client, `api_schemas.client` (`SaliencyClient`, `AsyncSaliencyClient`, `SaliencyError`, also importable from
here): it is loaded on first use only, so importing the models alone does not import httpx.
"""

from typing import TYPE_CHECKING, Any

from api_schemas.errors import ErrorDetail, ErrorResponse
from api_schemas.explain import (
    CandidateScore,
    CropBox,
    EvaluationMetricInfo,
    ExplainJsonRequest,
    ExplainOptions,
    ExplainResponse,
    LayerMap,
    MapEvaluation,
    MapStatistics,
    MeasuredQuality,
    MethodInfo,
    MethodListResponse,
    MethodResult,
    MethodSelection,
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
from api_schemas.models import BatchingInfo, ModelInfo, ModelListResponse, Preprocessing, WeightsInfo
from api_schemas.predict import ClassScore, PredictJsonRequest, PredictOptions, PredictResponse, Timings
from api_schemas.v2 import (
    V2ErrorResponse,
    V2InferRequest,
    V2InferResponse,
    V2LiveResponse,
    V2ModelMetadata,
    V2ReadyResponse,
    V2RequestInput,
    V2RequestOutput,
    V2ResponseOutput,
    V2ServerMetadata,
    V2TensorMetadata,
)

__all__ = [
    "CandidateScore",
    "CropBox",
    "EvaluationMetricInfo",
    "ExplainJsonRequest",
    "ExplainOptions",
    "ExplainResponse",
    "LayerMap",
    "MapEvaluation",
    "MapStatistics",
    "MeasuredQuality",
    "MethodInfo",
    "MethodListResponse",
    "MethodResult",
    "MethodSelection",
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
    "Preprocessing",
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
    "V2ErrorResponse",
    "V2InferRequest",
    "V2InferResponse",
    "V2LiveResponse",
    "V2ModelMetadata",
    "V2ReadyResponse",
    "V2RequestInput",
    "V2RequestOutput",
    "V2ResponseOutput",
    "V2ServerMetadata",
    "V2TensorMetadata",
]

if TYPE_CHECKING:
    from api_schemas.client import AsyncSaliencyClient as AsyncSaliencyClient
    from api_schemas.client import JobTimeoutError as JobTimeoutError
    from api_schemas.client import SaliencyClient as SaliencyClient
    from api_schemas.client import SaliencyError as SaliencyError

# The client's names, resolved lazily (PEP 562); they stay out of `__all__`, which lists the models.
_CLIENT_NAMES = frozenset({"AsyncSaliencyClient", "SaliencyClient", "SaliencyError", "JobTimeoutError"})


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from api_schemas import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
