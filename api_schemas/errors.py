"""The JSON error envelope every non-2xx response uses."""

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    """What went wrong, in a machine-readable code and a human-readable message."""

    code: str = Field(description="Stable machine-readable error code.", examples=["image_too_large"])
    message: str = Field(
        description="Human-readable explanation naming the offending field or limit.",
        examples=["image has 100000000 pixels; the limit is 40000000"],
    )


class ErrorResponse(BaseModel):
    """Body of every error response: `{"error": {"code": ..., "message": ...}}`."""

    error: ErrorDetail
