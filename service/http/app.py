"""The FastAPI application: lifespan (load, queue, warm, drain), routes and error handling."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

from asgi_correlation_id import CorrelationIdMiddleware
from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from api_schemas.errors import validation_message
from service import __version__
from service.http.middleware import BodySizeLimitMiddleware, sane_request_id
from service.http.middleware import DrainingMiddleware
from service.http.observation import RequestObservationMiddleware
from service.http.auth import ApiKeyMiddleware, api_keys_from, cors_options, requires_key
from service.config import ServerSettings
from service.http.errors import (
    REQUEST_ID_HEADER, ApiError, V2Error, current_request_id, error_body_for, invalid_request,
)
from service.http.openapi import install_openapi
from service.http.routes import explain as explain_routes
from service.http.routes import health as health_routes
from service.http.routes import jobs as jobs_routes
from service.http.routes import methods as methods_routes
from service.http.routes import metrics as metrics_routes
from service.http.routes import models as models_routes
from service.http.routes import predict as predict_routes
from service.http.routes import ui as ui_routes
from service.http.routes import v2 as v2_routes
from service.model.served import ServedModel, load_served_model
from service.http.state import ServiceState
from service.http.tracing import install_tracing

log = logging.getLogger(__name__)

ModelLoader = Callable[[ServerSettings], dict[str, ServedModel]]

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request", 413: "body_too_large",
               408: "body_timeout", 414: "url_too_long"}


def load_models(settings: ServerSettings) -> dict[str, ServedModel]:
    """Load every configured model; any model whose weights cannot be obtained fails start-up."""
    if not settings.models:
        raise ValueError("no models configured")
    return {cfg.id: load_served_model(cfg, settings) for cfg in settings.models}


def _install_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, answered with the envelope of an ApiError."""

    def respond(error: ApiError, request: Request | None = None) -> JSONResponse:
        body = error.body() if request is None else error_body_for(error, request.url.path)
        return JSONResponse(body, status_code=error.status, headers=error.headers)

    def respond_v2(error: V2Error) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(V2Error)
    async def v2_error(_: Request, exc: V2Error) -> JSONResponse:
        return respond_v2(exc)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return respond(exc, request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return respond(ApiError(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None)), request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(invalid_request(validation_message(exc.errors())), request)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        # Answered by Starlette's outermost ServerErrorMiddleware, outside the request-id middleware: the header here.
        request_id = current_request_id()
        headers = None if request_id is None else {REQUEST_ID_HEADER: request_id}
        return respond(ApiError(500, "internal_error", f"{type(exc).__name__}: {exc}", headers), request)


def operation_id(route: APIRoute) -> str:
    """The OpenAPI operation id of a route: its function's name in camelCase (`list_models` -> `listModels`), so
    generated clients get `predict`, `explain`, `listModels` instead of FastAPI's path-derived names."""
    first, *rest = route.name.split("_")
    return first + "".join(word.capitalize() for word in rest)


def create_app(
    settings: ServerSettings,
    models: dict[str, ServedModel] | None = None,
    model_loader: ModelLoader = load_models,
) -> FastAPI:
    """Build the app. `models` injects already-loaded models (tests); otherwise `model_loader` runs at start-up."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = models if models is not None else await asyncio.to_thread(model_loader, settings)
        state = ServiceState(settings=settings, models=loaded)
        app.state.service = state
        state.start_queues()
        state.warmup_task = asyncio.create_task(state.warm_up(), name="warm-up")
        try:
            yield
        finally:
            await state.shutdown()

    app = FastAPI(
        title="saliency-server",
        version=__version__,
        description="Batched predictions and saliency maps for timm image classifiers.",
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
        docs_url=None,  # /docs and /redoc: service/http/routes/ui.py, with their assets served from here
        redoc_url=None,
    )
    for routes in (health_routes, models_routes, predict_routes, explain_routes, methods_routes, metrics_routes,
                   jobs_routes, v2_routes):
        app.include_router(routes.router)
    ui_routes.install(app, settings)  # the comparison page at / (ui_enabled), /docs and /redoc
    _install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes,
                       max_url_bytes=settings.max_url_bytes, body_timeout_s=settings.body_timeout_s)
    # After SIGTERM: 503 shutting_down for every new request but the probes and /metrics (service/http/serving.py).
    app.add_middleware(DrainingMiddleware, service=lambda: getattr(app.state, "service", None))
    # API keys (when configured): 401 before any work, inside the observation (401s counted and logged).
    api_keys = api_keys_from(settings)
    if api_keys is not None:
        app.add_middleware(ApiKeyMiddleware, keys=api_keys, metrics_require_key=settings.metrics_require_key,
                           routes=lambda: app.routes)
    # CORS (when origins are configured), outside the keys: preflights answered, and a 401 readable by the page.
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, **cors_options(settings.cors_origins))
    # Sees every request, the ones the body-size limit refuses included.
    app.add_middleware(RequestObservationMiddleware, service=lambda: getattr(app.state, "service", None))
    # Outermost: X-Request-ID kept (when sane) or generated, on every response; the access log and error bodies
    # read it (asgi_correlation_id.correlation_id).
    app.add_middleware(CorrelationIdMiddleware, header_name=REQUEST_ID_HEADER, validator=sane_request_id)
    # With keys, the document declares them (bearer and X-API-Key) on every operation that needs one.
    install_openapi(app, None if api_keys is None else lambda path: requires_key(path, settings.metrics_require_key))
    install_tracing(app)  # only when the OTEL_* variables ask for it
    return app
