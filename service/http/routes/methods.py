"""The explanation-method catalogue (`GET /v1/methods`)."""

from fastapi import APIRouter

from api_schemas import EvaluationMetricInfo, MethodListResponse
from service.explain.evaluation import METRICS
from service.explain.quality import shipped_quality
from service.explain.registry import all_methods
from service.http.responses import method_info

router = APIRouter(tags=["explain"])


@router.get("/v1/methods", response_model=MethodListResponse, summary="Every explanation method")
async def list_methods() -> MethodListResponse:
    return MethodListResponse(
        methods=[method_info(m) for m in all_methods().values()],
        evaluation_metrics=[
            EvaluationMetricInfo(name=m.name, description=m.description, higher_is_better=m.higher_is_better,
                                 forward_passes=m.forward_passes)
            for m in METRICS.values()
        ],
        quality_report=shipped_quality()[0],
    )
