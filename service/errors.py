"""API errors and their JSON envelope `{"error": {"code": ..., "message": ...}}`."""

from __future__ import annotations

from typing import Any

from api_schemas import ErrorResponse


class ApiError(Exception):
    """An error answered to the client with a status, a stable code and a message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message)


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


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
