"""Opt-in OpenTelemetry tracing: with spans exported to memory through `install_tracing`, each request's server
span holds its decode, queue-wait and render spans, and each batch's compute span is linked to the span of every
request it served; without the OTEL_* variables nothing is installed and no span is made."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from starlette.middleware.errors import ServerErrorMiddleware

from service.config import ServerSettings
from service.http.app import create_app
from service.http.tracing import exporter_names, install_tracing, tracing_configured
from service.model.served import ServedModel
from tests.helpers import (
    load_models,
    png_bytes,
    random_image,
    settings_for,
    tiny_vit_config,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = "pair"
OTEL_VARIABLES = ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                  "OTEL_SDK_DISABLED", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES")


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def no_otel_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    """The exporter of this process's tracer provider, installed once (a process's provider is set only once)."""
    exporter = InMemorySpanExporter()
    provider = install_tracing(FastAPI(), exporter)
    if trace.get_tracer_provider() is not provider:
        pytest.skip("another tracer provider was installed in this process before: the spans would go there")
    return exporter


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    exporter.clear()
    yield exporter
    exporter.clear()


@pytest.fixture(scope="module")
def settings() -> ServerSettings:
    # `pair` forms a batch exactly when two requests have arrived (one lane, a cap of 2, a long wait)
    return settings_for(tiny_vit_config(MODEL, max_batch_size=2, max_wait_ms=10_000.0, dispatch_when_idle=False),
                        cpu_workers=1)


@pytest.fixture(scope="module")
def models(settings: ServerSettings) -> dict[str, ServedModel]:
    return load_models(settings)


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            for _ in range(600):
                if (await client.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.01)
            else:
                raise TimeoutError("app never became ready")
            yield client


def image(seed: int) -> dict:
    return {"files": {"file": ("x.png", png_bytes(random_image(seed)), "image/png")}}


async def predict_and_explain(client: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response]:
    """A prediction and an explanation sent together: `pair` serves them in one batch."""
    predicted, explained = await asyncio.gather(
        client.post(f"/v1/models/{MODEL}/predict", **image(1)),
        client.post(f"/v1/models/{MODEL}/explain", data={"methods": json.dumps(["rollout"])}, **image(2)),
    )
    assert predicted.status_code == 200, predicted.text
    assert explained.status_code == 200, explained.text
    return predicted, explained


def named(finished: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in finished if s.name == name]


def children(finished: list[ReadableSpan], parent: ReadableSpan, name: str) -> list[ReadableSpan]:
    return [s for s in named(finished, name)
            if s.parent is not None and s.parent.span_id == parent.context.span_id
            and s.context.trace_id == parent.context.trace_id]


@pytest.mark.anyio
async def test_each_request_has_a_server_span_holding_its_decode_queue_wait_and_render_spans(
    spans: InMemorySpanExporter, settings: ServerSettings, models: dict[str, ServedModel],
) -> None:
    app = create_app(settings, models=models)
    install_tracing(app, spans)
    async with serving(app) as client:
        predicted, explained = await predict_and_explain(client)
    finished = list(spans.get_finished_spans())
    servers = {s.name: s for s in finished if s.kind == SpanKind.SERVER}
    assert set(servers) == {"POST /v1/models/{model_id}/predict", "POST /v1/models/{model_id}/explain"}, servers
    predict_span = servers["POST /v1/models/{model_id}/predict"]
    explain_span = servers["POST /v1/models/{model_id}/explain"]
    assert predict_span.attributes["saliency.request_id"] == predicted.headers["x-request-id"]
    assert explain_span.attributes["saliency.request_id"] == explained.headers["x-request-id"]
    for server in (predict_span, explain_span):
        [decode] = children(finished, server, "decode")
        [waiting] = children(finished, server, "queue wait")
        assert decode.attributes["saliency.model"] == MODEL and decode.attributes["saliency.upload_bytes"] > 0
        assert waiting.attributes["saliency.batch_started"] is True
        assert decode.end_time <= waiting.start_time <= waiting.end_time <= server.end_time
    assert [w.attributes["saliency.kind"] for w in (children(finished, predict_span, "queue wait")
                                                    + children(finished, explain_span, "queue wait"))] == \
        ["predict", "explain"]
    [render] = children(finished, explain_span, "render")
    assert not children(finished, predict_span, "render")  # a prediction renders nothing
    assert render.start_time >= children(finished, explain_span, "queue wait")[0].end_time
    # the probes that waited for readiness are not traced
    assert not [s for s in finished if s.kind == SpanKind.SERVER and "readyz" in s.name]


@pytest.mark.anyio
async def test_a_batch_has_one_compute_span_linked_to_every_request_it_served(
    spans: InMemorySpanExporter, settings: ServerSettings, models: dict[str, ServedModel],
) -> None:
    app = create_app(settings, models=models)
    install_tracing(app, spans)
    async with serving(app) as client:
        predicted, _ = await predict_and_explain(client)
    assert predicted.json()["timings"]["batch_size"] == 2
    finished = list(spans.get_finished_spans())
    [batch] = named(finished, "batch compute")
    servers = [s for s in finished if s.kind == SpanKind.SERVER]
    assert len(servers) == 2
    assert {(link.context.trace_id, link.context.span_id) for link in batch.links} == \
        {(s.context.trace_id, s.context.span_id) for s in servers}
    assert batch.parent is None  # a trace of its own, shared by the requests through the links
    assert batch.context.trace_id not in {s.context.trace_id for s in servers}
    assert batch.attributes["saliency.batch_size"] == 2 and batch.attributes["saliency.model"] == MODEL
    assert sorted(batch.attributes["saliency.kinds"]) == ["explain", "predict"]
    assert batch.attributes["saliency.failed_items"] == 0
    for server in servers:  # the wait ends where the batch starts
        [waiting] = children(finished, server, "queue wait")
        assert waiting.end_time == batch.start_time


@pytest.mark.anyio
async def test_an_incoming_traceparent_continues_the_callers_trace(
    spans: InMemorySpanExporter, settings: ServerSettings, models: dict[str, ServedModel],
) -> None:
    app = create_app(settings, models=models)
    install_tracing(app, spans)
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with serving(app) as client:
        response = await client.get("/v1/models", headers={"traceparent": f"00-{caller_trace}-{caller_span}-01"})
    assert response.status_code == 200
    [server] = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert f"{server.context.trace_id:032x}" == caller_trace
    assert server.parent is not None and f"{server.parent.span_id:016x}" == caller_span


def test_without_tracing_configured_the_app_is_not_instrumented(settings: ServerSettings) -> None:
    assert not tracing_configured()
    app = create_app(settings, models={})  # reads the (absent) OTEL_* variables
    assert not getattr(app, "_is_instrumented_by_opentelemetry", False)
    assert "tracer_provider" not in app.state._state
    assert isinstance(app.build_middleware_stack(), ServerErrorMiddleware)  # no OpenTelemetry middleware around it
    other = FastAPI()
    assert install_tracing(other, env={"OTEL_SERVICE_NAME": "x"}) is None
    assert not getattr(other, "_is_instrumented_by_opentelemetry", False)


# Run in a process of its own: this one has a tracer provider (the `exporter` fixture).
UNTRACED_PROCESS = """
import asyncio, json
from opentelemetry import trace
import service.http.tracing as tracing
import service.runtime.batching as batching
from tests.helpers import running_app, settings_for, tiny_vit_config, png_bytes, random_image

started = []
class Counting:
    def __init__(self, inner):
        self.inner = inner
    def start_span(self, *args, **kwargs):
        started.append(args[0])
        return self.inner.start_span(*args, **kwargs)
    def start_as_current_span(self, *args, **kwargs):
        started.append(args[0])
        return self.inner.start_as_current_span(*args, **kwargs)
tracing.tracer = Counting(tracing.tracer)
batching.tracer = Counting(batching.tracer)

async def main():
    async with running_app(settings_for(tiny_vit_config("pair"))) as (client, app):
        files = {"file": ("x.png", png_bytes(random_image(1)), "image/png")}
        statuses = [r.status_code for r in await asyncio.gather(
            client.post("/v1/models/pair/predict", files=files),
            client.post("/v1/models/pair/explain", files=files, data={"methods": '["rollout"]'}))]
        instrumented = bool(getattr(app, "_is_instrumented_by_opentelemetry", False))
        return {"statuses": statuses, "started": started, "instrumented": instrumented,
                "provider": type(trace.get_tracer_provider()).__name__}

print(json.dumps(asyncio.run(main())))
"""


def test_without_tracing_configured_requests_start_no_span_and_no_provider_is_installed() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SALIENCY_"))}
    result = subprocess.run([sys.executable, "-c", UNTRACED_PROCESS], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome == {"statuses": [200, 200], "started": [], "instrumented": False,
                       "provider": "ProxyTracerProvider"}


@pytest.mark.parametrize(("env", "exporters"), [
    ({}, []),
    ({"OTEL_SERVICE_NAME": "saliency"}, []),
    ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
    ({"OTEL_TRACES_EXPORTER": "otlp,console"}, ["otlp", "console"]),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, ["otlp"]),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, []),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"}, []),
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "TRUE"}, []),
])
def test_the_standard_otel_variables_turn_tracing_on_and_off(env: dict[str, str], exporters: list[str]) -> None:
    assert exporter_names(env) == exporters
    assert tracing_configured(env) is bool(exporters)


@pytest.mark.parametrize(("service_name", "expected"), [(None, "saliency-server"), ("vision-api", "vision-api")])
def test_an_otlp_endpoint_installs_an_otlp_exporter_for_the_named_service(
    exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch, service_name: str | None, expected: str,
) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # nothing is sent: no span is made
    if service_name is not None:
        monkeypatch.setenv("OTEL_SERVICE_NAME", service_name)
    app = FastAPI()
    provider = install_tracing(app)
    assert isinstance(provider, TracerProvider)
    try:
        assert app.state.tracer_provider is provider and app._is_instrumented_by_opentelemetry
        assert provider.resource.attributes["service.name"] == expected
        processors = provider._active_span_processor._span_processors
        assert [type(p) for p in processors] == [BatchSpanProcessor]
        assert isinstance(processors[0].span_exporter, OTLPSpanExporter)
    finally:
        provider.shutdown()
