"""The explanation-method catalogue (`GET /v1/methods`)."""

from fastapi import APIRouter

from api_schemas import MethodInfo, MethodListResponse
from service.explain.registry import ExplainMethod, all_methods

router = APIRouter(tags=["explain"])


def method_info(method: ExplainMethod) -> MethodInfo:
    return MethodInfo(
        name=method.name,
        description=method.description,
        families=list(method.families),
        class_specific=method.class_specific,
        params_schema=method.params_model.model_json_schema(),
        relative_cost=method.relative_cost,
        cost_note=method.cost_note,
    )


@router.get("/v1/methods", response_model=MethodListResponse, summary="Every explanation method")
async def list_methods() -> MethodListResponse:
    return MethodListResponse(methods=[method_info(m) for m in all_methods().values()])
