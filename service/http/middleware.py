"""ASGI middleware: bodies over the configured size rejected with 413 before they are buffered; the request id
(`X-Request-ID`) kept or generated; new requests refused with 503 while the server drains."""

from __future__ import annotations

import asyncio
import json
import re
from typing import TYPE_CHECKING, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.http.errors import ApiError, error_body_for, shutting_down

if TYPE_CHECKING:
    from service.http.state import ServiceState

# A client's X-Request-ID is kept when it is 1 to 128 of these characters (a UUID, a trace id, `req-42`...);
# anything else (spaces, quotes, control characters: log injection) is replaced by a generated one.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._~:@/+=-]{1,128}")


def sane_request_id(value: str) -> bool:
    """Whether an incoming X-Request-ID is kept (CorrelationIdMiddleware's validator)."""
    return _SANE_REQUEST_ID.fullmatch(value) is not None


class BodySizeLimitMiddleware:
    """Checks Content-Length up front and counts streamed bytes for chunked bodies; also refuses overlong URLs
    (414) and bodies that do not arrive within `body_timeout_s` of the request's headers (408, slow clients), all in
    the JSON envelope."""

    def __init__(
        self, app: ASGIApp, max_body_bytes: int, max_url_bytes: int | None = None, body_timeout_s: float | None = None
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_url_bytes = max_url_bytes
        self.body_timeout_s = body_timeout_s

    def _url_too_long(self, size: int) -> ApiError | None:
        if self.max_url_bytes is None or size <= self.max_url_bytes:
            return None
        return ApiError(414, "url_too_long", f"the URL is {size} bytes; the limit is {self.max_url_bytes} bytes "
                        "(max_url_bytes): send options in the request body")

    def _body_timeout(self) -> ApiError:
        # Connection: close, as the rest of the body may still be on its way.
        return ApiError(408, "body_timeout", f"the request body did not arrive within {self.body_timeout_s:g} s "
                        "(body_timeout_s): send it faster, or send a smaller one", {"Connection": "close"})

    def _too_large(self, size: int | str) -> ApiError:
        return ApiError(
            413, "body_too_large", f"request body is {size} bytes; the limit is {self.max_body_bytes} bytes"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        url_error = self._url_too_long(len(scope.get("raw_path") or scope.get("path", "").encode())
                                       + len(scope.get("query_string", b"")))
        if url_error is not None:
            await _send_error(send, url_error, scope.get("path", ""))
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                await _send_error(send, self._too_large(int(value)), scope.get("path", ""))
                return
        received = 0
        loop = asyncio.get_running_loop()
        deadline = None if self.body_timeout_s is None else loop.time() + self.body_timeout_s

        body_done = False  # after the body, receive() only waits for a disconnect: no deadline on that

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if deadline is None or body_done:
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    raise self._body_timeout() from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise self._too_large(f"more than {self.max_body_bytes}")
                body_done = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)


async def _send_error(send: Send, error: ApiError, path: str = "") -> None:
    """The error answered before the app runs, in the envelope of the route asked for (the Open Inference
    Protocol's `{"error": message}` under /v2), with the request's id (set by the request-id middleware, outside this
    one, which also adds the X-Request-ID header)."""
    body = json.dumps(error_body_for(error, path)).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra],
        }
    )
    await send({"type": "http.response.body", "body": body})


# Answer during a drain: liveness (a draining process is alive), readiness (it says 503 itself) and the metrics.
DRAIN_EXEMPT = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})


class DrainingMiddleware:
    """Once the server drains (SIGTERM, `ServiceState.draining`), every new request but the probes and `/metrics`
    gets 503 `shutting_down` with `Retry-After` and `Connection: close`, so that clients and load balancers retry
    on another replica; the requests already inside go on."""

    def __init__(self, app: ASGIApp, service: Callable[[], ServiceState | None]) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = self.service() if scope["type"] == "http" else None
        path = scope.get("path", "")
        if service is not None and service.draining and path not in DRAIN_EXEMPT:
            error = shutting_down("the server is shutting down: retry on another replica")
            error.headers = {**(error.headers or {}), "Connection": "close"}  # the client reconnects elsewhere
            await _send_error(send, error, path)
            return
        await self.app(scope, receive, send)
