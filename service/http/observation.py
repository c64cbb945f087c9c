"""Each HTTP request observed once, whatever its outcome: its latency and count by model, endpoint, status and error
code (metrics), and its access-log line. Routes add what only they know (the model's work: queue wait, compute,
batch size, methods) to the request's `RequestObservation` through `current_observation()`."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
from typing import TYPE_CHECKING, Callable

from asgi_correlation_id import correlation_id
from opentelemetry import trace
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.runtime.batching import BatchedResult
from service.runtime.metrics import NO_MODEL, RequestObservation

if TYPE_CHECKING:
    from service.http.state import ServiceState

access_log = logging.getLogger("saliency.access")

_MODEL_PATH = re.compile(r"^/v1/models/([^/]+)(?:/([a-z_]+))?$")
_V2_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/|$)")
# Probes, scrapes and the page's static files: logged at debug, not info (they would drown the log).
QUIET_ENDPOINTS = frozenset({"healthz", "readyz", "metrics", "v2_live", "v2_ready", "v2_model_ready", "ui_assets",
                             "docs_assets"})
_UNMATCHED = "unmatched"  # paths no route serves: one label value, whatever the path

_current: contextvars.ContextVar[RequestObservation | None] = contextvars.ContextVar("saliency_request", default=None)


def current_observation() -> RequestObservation | None:
    """The observation of the request being handled (None outside one)."""
    return _current.get()


def observe_batched(result: BatchedResult, methods: tuple[str, ...] = ()) -> None:
    """Record how the model served the current request: queue wait, compute and batch size (and the methods)."""
    observation = current_observation()
    if observation is None:
        return
    observation.queue_seconds = result.queue_ms / 1000.0
    observation.compute_seconds = result.compute_ms / 1000.0
    observation.batch_size = result.batch_size
    if methods:
        observation.methods = methods


def _endpoint(scope: Scope) -> str:
    """The route's name (`predict`, `explain`, `list_models`, `healthz`...), or `unmatched`."""
    route = scope.get("route")
    name = getattr(route, "name", None)
    return name if isinstance(name, str) and name else _UNMATCHED


def _model(path: str, known: Callable[[str], bool]) -> str:
    match = _MODEL_PATH.match(path) or _V2_MODEL_PATH.match(path)
    if match is None:
        return NO_MODEL
    return match.group(1) if known(match.group(1)) else "unknown"


def _error_code(body: bytes, status: int) -> str:
    """The error envelope's code (`{"error": {"code": ...}}`); `error` for the Open Inference Protocol's
    `{"error": message}`; `http_<status>` for other bodies (/readyz's 503 is its readiness report)."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        return error["code"]
    return "error" if isinstance(error, str) else f"http_{status}"


class RequestObservationMiddleware:
    """Outermost middleware: times every HTTP request, notes its status and error code (read from the error body),
    then records it in the metrics and writes its access-log line."""

    def __init__(self, app: ASGIApp, service: Callable[[], ServiceState | None]) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        span = trace.get_current_span()  # the request's server span when tracing is on
        if span.is_recording():
            span.set_attribute("saliency.request_id", correlation_id.get() or "")
        observation = RequestObservation(endpoint=_UNMATCHED)
        token = _current.set(observation)
        error_body = bytearray()
        service = self.service()
        path = scope.get("path", "")
        observation.model = _model(path, lambda model: service is not None and model in service.models)

        async def observing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                observation.status = message["status"]
            elif message["type"] == "http.response.body" and observation.status >= 400 and len(error_body) < 65536:
                error_body.extend(message.get("body", b""))
            await send(message)

        in_flight = None if service is None else service.metrics.in_flight.labels(observation.model)
        if in_flight is not None:
            in_flight.inc()
        try:
            await self.app(scope, receive, observing_send)
        finally:
            if in_flight is not None:
                in_flight.dec()
            _current.reset(token)
            observation.seconds = time.perf_counter() - started
            observation.endpoint = _endpoint(scope)
            service = service or self.service()
            if observation.status >= 400:
                observation.code = _error_code(bytes(error_body), observation.status)
            if service is not None:
                service.metrics.observe_request(observation)
            log_request(scope, observation)


def log_request(scope: Scope, observation: RequestObservation) -> None:
    """One access-log line per request, its fields also given as the record's `extra` (JSON logs show them as keys)."""
    level = logging.DEBUG if observation.endpoint in QUIET_ENDPOINTS and observation.status < 500 else logging.INFO
    if not access_log.isEnabledFor(level):
        return
    client = scope.get("client")
    query = scope.get("query_string", b"").decode("latin-1")
    fields = {
        "request_id": correlation_id.get(),  # X-Request-ID, kept or generated (the middleware outside this one)
        "client": f"{client[0]}:{client[1]}" if client else "",
        "method": scope.get("method", ""),
        "path": scope.get("path", "") + (f"?{query}" if query else ""),
        "endpoint": observation.endpoint,
        "model": observation.model,
        "methods": list(observation.methods),
        "status": observation.status,
        "code": observation.code,
        "duration_ms": round(observation.seconds * 1000.0, 2),
        "queue_ms": None if observation.queue_seconds is None else round(observation.queue_seconds * 1000.0, 2),
        "compute_ms": None if observation.compute_seconds is None else round(observation.compute_seconds * 1000.0, 2),
        "batch_size": observation.batch_size,
        "caller": observation.caller,  # the API key's fingerprint (never the key); empty without keys
    }
    details = " ".join(f"{key}={fields[key]}" for key in ("model", "caller", "code", "queue_ms", "compute_ms",
                                                          "batch_size")
                       if fields[key] not in (None, "", NO_MODEL))
    methods = f" methods={','.join(observation.methods)}" if observation.methods else ""
    access_log.log(level, "%s %s %s %d %.1fms%s%s", fields["client"] or "-", fields["method"], fields["path"],
                   observation.status, observation.seconds * 1000.0, (" " + details) if details else "", methods,
                   extra=fields)
