"""Listing the served models (`/v1/models`)."""

from fastapi import APIRouter, Depends

from api_schemas import BatchingInfo, ModelInfo, ModelListResponse, WeightsInfo
from service.runtime.batching import lane_batch_cap
from service.http.dependencies import get_model, get_state
from service.http.errors import error_responses
from service.model.served import ServedModel
from service.http.state import ServiceState

router = APIRouter(tags=["models"])


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


@router.get("/v1/models", response_model=ModelListResponse, summary="Every served model")
async def list_models(state: ServiceState = Depends(get_state)) -> ModelListResponse:
    return ModelListResponse(models=[model_info(m) for m in state.models.values()])


@router.get("/v1/models/{model_id}", response_model=ModelInfo, summary="One served model", responses=error_responses(404))
async def get_model_info(served: ServedModel = Depends(get_model)) -> ModelInfo:
    return model_info(served)
