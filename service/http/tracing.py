"""Opt-in OpenTelemetry tracing, configured by the standard `OTEL_*` environment variables.

On when `OTEL_TRACES_EXPORTER` names an exporter (`otlp`, `console`; `none` is off) or when
`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (OTLP over HTTP/protobuf), unless
`OTEL_SDK_DISABLED=true`. The service is named by `OTEL_SERVICE_NAME` (or `service.name` in
`OTEL_RESOURCE_ATTRIBUTES`), `saliency-server` by default; the exporter, batching (`OTEL_BSP_*`) and sampler
(`OTEL_TRACES_SAMPLER`) read their own variables. An incoming W3C `traceparent` continues the caller's trace.

Spans: the server span of each request (opentelemetry-instrumentation-fastapi; probes left out, see
`OTEL_PYTHON_FASTAPI_EXCLUDED_URLS`), and inside it `decode` (upload decoding and preprocessing), `queue wait` (from
enqueueing to the start of its batch) and `render` (maps to images); each batch's `batch compute` span is its own
trace, linked to the span of every request it serves (service/runtime/batching.py).

Off, nothing is installed: the app is not instrumented, and the span helpers create nothing (`span` checks that the
current request is traced before starting a span; the OpenTelemetry API without an SDK provider is a no-op).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)

SERVICE_NAME = "saliency-server"
# Probes and scrapes are not traced unless OTEL_PYTHON_FASTAPI_EXCLUDED_URLS says otherwise (regexes, comma-separated).
DEFAULT_EXCLUDED_URLS = "/healthz$,/readyz$,/metrics$,/v2/health/"

tracer = trace.get_tracer("saliency-server")  # the installed provider's once there is one; a no-op until then


def span(name: str, **attributes: Any) -> AbstractContextManager[Any]:
    """A child span of the current request's span, made current; nothing at all when the request is not traced."""
    if not trace.get_current_span().is_recording():
        return nullcontext()
    return tracer.start_as_current_span(name, attributes=attributes)


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def exporter_names(env: Mapping[str, str]) -> list[str]:
    """The trace exporters the environment asks for; none means tracing is off."""
    if _true(env.get("OTEL_SDK_DISABLED")):
        return []
    named = [name.strip().lower() for name in env.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()]
    if named:
        return [name for name in named if name != "none"]
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return ["otlp"]
    return []


def tracing_configured(env: Mapping[str, str] | None = None) -> bool:
    """Whether the OTEL_* variables turn tracing on."""
    return bool(exporter_names(os.environ if env is None else env))


def _exporters(names: list[str], env: Mapping[str, str]) -> Iterator[SpanExporter]:
    for name in names:
        if name in ("otlp", "otlp_proto_http"):
            protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            if protocol not in (None, "", "http/protobuf"):
                log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s: this server exports OTLP over http/protobuf only",
                            protocol)
            from opentelemetry.exporter.otlp.proto.http import trace_exporter as otlp

            yield otlp.OTLPSpanExporter()  # endpoint, headers, timeout...: from the OTEL_EXPORTER_OTLP_* variables
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            yield ConsoleSpanExporter()
        else:
            log.warning("OTEL_TRACES_EXPORTER names %r, which this server does not ship (otlp, console): ignored", name)


def _provider(exporters: list[SpanExporter], synchronous: bool) -> TracerProvider:
    from opentelemetry.sdk.resources import SERVICE_NAME as SERVICE_NAME_KEY
    from opentelemetry.sdk.resources import SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    from service import __version__

    resource = Resource.create({SERVICE_VERSION: __version__})  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(SERVICE_NAME_KEY, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME_KEY: SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(SimpleSpanProcessor(exporter) if synchronous else BatchSpanProcessor(exporter))
    return provider


def install_tracing(app: FastAPI, exporter: SpanExporter | None = None,
                    env: Mapping[str, str] | None = None) -> TracerProvider | None:
    """Trace the app when the OTEL_* variables (`env`, default the process's) ask for it, or into `exporter` (spans
    exported as they end: tests, embedding): instrument it and make the provider the process's, for the spans of
    decoding, queueing, batches and rendering. Returns the provider, or None when tracing is off (nothing installed).

    The process's provider is set once: a later install instruments its app with its own provider, but the other
    spans still go to the first one."""
    env = os.environ if env is None else env
    if exporter is not None:
        provider = _provider([exporter], synchronous=True)
    else:
        exporters = list(_exporters(exporter_names(env), env))
        if not exporters:
            return None
        provider = _provider(exporters, synchronous=False)
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):  # not set yet (setting twice is refused)
        trace.set_tracer_provider(provider)
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=provider,
        excluded_urls=env.get("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS", DEFAULT_EXCLUDED_URLS),
        exclude_spans=["receive", "send"],  # one span per ASGI message: noise
    )
    app.state.tracer_provider = provider
    log.info("tracing on: service %s", provider.resource.attributes.get("service.name"))
    return provider
