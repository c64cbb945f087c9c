"""Listing the served models (`/v1/models`)."""

from fastapi import APIRouter, Depends

from api_schemas import ModelInfo, ModelListResponse
from service.http.dependencies import get_model, get_state
from service.http.errors import error_responses
from service.http.responses import model_info
from service.http.state import ServiceState
from service.model.served import ServedModel

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelListResponse, summary="Every served model")
async def list_models(state: ServiceState = Depends(get_state)) -> ModelListResponse:
    return ModelListResponse(models=[model_info(m) for m in state.models.values()])


@router.get("/v1/models/{model_id}", response_model=ModelInfo, summary="One served model", responses=error_responses(404))
async def get_model_info(served: ServedModel = Depends(get_model)) -> ModelInfo:
    return model_info(served)
