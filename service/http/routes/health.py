"""Liveness (`/healthz`) and readiness (`/readyz`)."""

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from api_schemas import HealthResponse, ReadinessResponse
from service.http.dependencies import get_state
from service.http.state import ServiceState

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse, summary="The process is alive")
@router.head("/healthz", include_in_schema=False)  # probes and load balancers often check with HEAD
async def healthz() -> HealthResponse:
    return HealthResponse()


@router.head("/readyz", include_in_schema=False)
@router.get(
    "/readyz",
    response_model=ReadinessResponse,
    summary="Every model is loaded and warm",
    responses={503: {"model": ReadinessResponse, "description": "At least one model is still warming up."}},
)
async def readyz(state: ServiceState = Depends(get_state)) -> JSONResponse:
    body = ReadinessResponse(ready=state.ready, models={m.id: m.ready for m in state.models.values()})
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)
