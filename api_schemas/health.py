"""Liveness and readiness responses."""

from typing import Literal

from pydantic import BaseModel, Field


class HealthResponse(BaseModel):
    """The process is alive and serving HTTP."""

    status: Literal["ok"] = "ok"


class ReadinessResponse(BaseModel):
    """Whether every configured model is loaded and warmed up."""

    ready: bool
    models: dict[str, bool] = Field(description="Per model id: whether it is warm.")
