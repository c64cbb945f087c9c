"""API errors, their JSON envelope `{"error": {"code": ..., "message": ...}}`, and batch-queue failures mapped to them."""

from __future__ import annotations

import logging
from typing import Any

from api_schemas import ErrorDetail, ErrorResponse
from service.runtime.batching import BatchedResult, BatchQueue, QueueClosedError, QueueFullError, RequestTimeoutError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered to the client with a status, a stable code and a message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers

    def body(self) -> dict[str, Any]:
        """The JSON envelope, as documented by ErrorResponse."""
        return ErrorResponse(error=ErrorDetail(code=self.code, message=self.message)).model_dump()


def invalid_request(message: str) -> ApiError:
    """422 for a request field that failed validation; the message names the field."""
    return ApiError(422, "invalid_request", message)


def shutting_down(message: str) -> ApiError:
    """503 for work refused because the server is draining before it stops."""
    return ApiError(503, "shutting_down", message, {"Retry-After": "5"})


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries documenting the error envelope for the given statuses."""
    descriptions = {
        400: "The request body is not a usable image (not an image, truncated, empty) or is malformed.",
        404: "No such model.",
        413: "The request body or the decoded image is larger than the configured limit.",
        415: "Unsupported content type.",
        422: "A field failed validation; the message names it.",
        503: "The model's queue is full, it is still warming up, or the server is shutting down (see Retry-After).",
        504: "The result did not arrive within the model's timeout.",
        500: "Computing this request failed.",
    }
    return {s: {"model": ErrorResponse, "description": descriptions[s]} for s in statuses}


async def submit_or_raise(queue: BatchQueue, payload: Any) -> BatchedResult:
    """Submit and wait; 503 when full or closing, 504 on timeout, the item's own ApiError, else 500."""
    try:
        return await queue.submit(payload)
    except QueueFullError as exc:
        raise ApiError(503, "queue_full", str(exc), {"Retry-After": "1"}) from None
    except QueueClosedError as exc:
        raise shutting_down(str(exc)) from None
    except RequestTimeoutError as exc:
        raise ApiError(504, "timeout", str(exc)) from None
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - one item's failure, reported to its own client only
        log.exception("model %r: computing a request failed", queue.name)
        raise ApiError(500, "inference_failed", f"computing this request failed: {type(exc).__name__}: {exc}") from None
