"""API errors, their JSON envelope `{"error": {"code": ..., "message": ..., "request_id": ...}}`, and batch-queue
failures mapped to them."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from asgi_correlation_id import correlation_id
from starlette.requests import Request

from api_schemas import ErrorDetail, ErrorResponse, V2ErrorResponse
from service.runtime.batching import BatchedResult, BatchQueue, QueueClosedError, QueueFullError, RequestTimeoutError

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"


def current_request_id() -> str | None:
    """The id of the request being answered (its X-Request-ID, kept or generated), None outside a request."""
    return correlation_id.get()


class ApiError(Exception):
    """An error answered to the client with a status, a stable code and a message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers

    def body(self) -> dict[str, Any]:
        """The JSON envelope, as documented by ErrorResponse, with the request's id when answering one."""
        detail = ErrorDetail(code=self.code, message=self.message, request_id=current_request_id())
        return ErrorResponse(error=detail).model_dump(exclude_none=True)


class V2Error(Exception):
    """An error of an Open Inference Protocol (/v2) route, answered in that protocol's shape `{"error": message}`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers

    @classmethod
    def from_api_error(cls, error: ApiError) -> "V2Error":
        return cls(error.status, error.message, error.headers)

    def body(self) -> dict[str, Any]:
        return V2ErrorResponse(error=self.message).model_dump()


def is_v2_path(path: str) -> bool:
    """Whether a path belongs to the Open Inference Protocol routes (errors there are `{"error": message}`)."""
    return path == "/v2" or path.startswith("/v2/")


def error_body_for(error: ApiError, path: str) -> dict[str, Any]:
    """The body answering `error` on `path`: the Open Inference Protocol's `{"error": message}` under /v2, else the
    envelope."""
    return V2Error.from_api_error(error).body() if is_v2_path(path) else error.body()


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
    responses: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorResponse, "description": descriptions[s]} for s in statuses
    }
    if 503 in responses:
        responses[503]["headers"] = {"Retry-After": RETRY_AFTER_HEADER}
    return responses


# The Retry-After header of 503 and 429 answers, as OpenAPI documents a response header.
RETRY_AFTER_HEADER: dict[str, Any] = {
    "description": "Seconds to wait before retrying (sent with queue_full, model_warming_up, shutting_down and "
                   "too_many_jobs).",
    "schema": {"type": "integer", "minimum": 0},
}


async def _until_disconnected(request: Request) -> None:
    """Returns when the client closes its connection. The body has been read, so the next ASGI message is the
    disconnect (uvicorn sends it as soon as the socket closes; httpx's in-process transport once the response is
    complete, and it cancels the handler itself when its caller is cancelled). A server that cannot tell is never
    taken for a disconnect."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # noqa: BLE001 - no disconnect to watch for: wait for the result alone
        await asyncio.get_running_loop().create_future()


async def submit_or_raise(queue: BatchQueue, payload: Any, request: Request | None = None) -> BatchedResult:
    """Submit and wait; 503 when full or closing, 504 on timeout, the item's own ApiError, else 500.

    With `request`, a client that disconnects while waiting abandons its item (never started, or stopped at the next
    chunk of its batch's work) and gets 499 `client_closed_request`, which nobody receives but the logs and metrics.
    """
    try:
        if request is None:
            return await queue.submit(payload)
        submitted = asyncio.ensure_future(queue.submit(payload))
        disconnected = asyncio.ensure_future(_until_disconnected(request))
        try:
            await asyncio.wait((submitted, disconnected), return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnected.cancel()
            if not submitted.done():  # the client went away (or this handler was cancelled): abandon the item
                submitted.cancel()
                await asyncio.gather(submitted, return_exceptions=True)
        if not submitted.done() or submitted.cancelled():
            raise ApiError(499, "client_closed_request", "the client closed the connection before the result")
        return submitted.result()
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
