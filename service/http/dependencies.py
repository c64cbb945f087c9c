"""FastAPI dependencies: the service state and the model a path names."""

from __future__ import annotations

from fastapi import Path, Request

from service.http.errors import ApiError
from service.model.served import ServedModel
from service.http.state import ServiceState

MODEL_ID = Path(description="Id of a served model (see GET /v1/models).")


def _state(request: Request) -> ServiceState:
    return request.app.state.service


def served_model(state: ServiceState, model_id: str) -> ServedModel:
    """The served model with this id, or 404."""
    served = state.models.get(model_id)
    if served is None:
        raise ApiError(404, "model_not_found", f"no model {model_id!r}; served models: {sorted(state.models)}")
    return served


def ready_model(state: ServiceState, model_id: str) -> ServedModel:
    """The served model, or 503 while it is warming up (with Retry-After) or when its warm-up failed."""
    served = served_model(state, model_id)
    if served.failure is not None:
        raise ApiError(503, "model_unavailable", f"model {model_id!r} cannot serve: {served.failure}")
    if not served.ready:
        raise ApiError(503, "model_warming_up", f"model {model_id!r} is still warming up", {"Retry-After": "1"})
    return served


# The dependencies are coroutines: FastAPI runs plain `def` dependencies in a worker thread, two thread
# hand-offs per /predict request for what are dictionary look-ups.
async def get_state(request: Request) -> ServiceState:
    return _state(request)


async def get_model(request: Request, model_id: str = MODEL_ID) -> ServedModel:
    """The served model named in the path, or 404."""
    return served_model(_state(request), model_id)


async def get_ready_model(request: Request, model_id: str = MODEL_ID) -> ServedModel:
    """The served model, or 503 while it is warming up (with Retry-After) or when its warm-up failed."""
    return ready_model(_state(request), model_id)
