"""The JSON error envelope every non-2xx response uses, and how validation errors are worded in it."""

from typing import Any, Iterable, Mapping

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    """What went wrong, in a machine-readable code and a human-readable message."""

    code: str = Field(description="Stable machine-readable error code.", examples=["image_too_large"])
    message: str = Field(
        description="Human-readable explanation naming the offending field or limit.",
        examples=["image has 100000000 pixels; the limit is 40000000"],
    )
    request_id: str | None = Field(
        default=None,
        description="The request's id, as in its `X-Request-ID` response header (the client's own when it sent a "
                    "usable one, else generated): quote it to find the request in the server's logs and traces. "
                    "Absent or null where no request is answered (a visualization job's error: the job outlives "
                    "the request that started it).",
        examples=["5f0c1c6b2a8e4a7f9d3b6e1a0c4d2f8e"],
    )


class ErrorResponse(BaseModel):
    """Body of every error response: `{"error": {"code": ..., "message": ..., "request_id": ...}}`."""

    error: ErrorDetail


def validation_message(errors: Iterable[Mapping[str, Any]], at: str = "") -> str:
    """The message of a 422 for failed validation: `field: problem` per error, joined by "; ".

    `errors` is pydantic's `ValidationError.errors()` (FastAPI's `RequestValidationError.errors()` has the same
    shape). Each field is the error's location as a dotted path, under `at` when the validated value sits inside a
    larger request (`methods[0].params`); an error about the whole value (an empty location) names `at`, or `body`.
    """
    prefix = [at] if at else []
    return "; ".join(
        f"{'.'.join(prefix + [str(p) for p in error['loc']]) or 'body'}: {error['msg']}" for error in errors
    )
