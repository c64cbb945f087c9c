"""Logs and request ids: `saliency-server serve` run as a process with `log_format` json (and text, the default),
its stderr read line by line: one access line per request with the request's id, the id echoed in X-Request-ID and
in error bodies, probes kept out of the info log, uvicorn's records in the same format and no access line of its
own."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from service.http.app import create_app
from service.http.logs import JsonLogFormatter, TextLogFormatter, logging_config
from tests.helpers import (
    TINY_VIT_KWARGS,
    png_bytes,
    random_image,
    settings_for,
    tiny_vit_config,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny_vit"
GENERATED_ID = re.compile(r"[0-9a-f]{32}")  # asgi-correlation-id's uuid4().hex


@dataclass
class Server:
    """A `saliency-server serve` process and the lines it has written so far (read by threads as they come)."""

    url: str
    process: subprocess.Popen
    stderr: list[str] = field(default_factory=list)
    stdout: list[str] = field(default_factory=list)

    def wait_for(self, found: Callable[[list[str]], bool], timeout: float = 30.0) -> list[str]:
        """The stderr lines once `found(lines)` holds (log records are written after the response is sent)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = list(self.stderr)
            if found(lines):
                return lines
            time.sleep(0.02)
        raise AssertionError("expected log lines never came:\n" + "\n".join(self.stderr))

    def json_records(self) -> list[dict]:
        return [json.loads(line) for line in list(self.stderr)]

    def access_records(self, request_id: str, timeout: float = 30.0) -> list[dict]:
        """The JSON access lines of the request with this id, once there is one."""

        def records(lines: list[str]) -> list[dict]:
            parsed = [json.loads(line) for line in lines]
            return [r for r in parsed if r.get("logger") == "saliency.access" and r.get("request_id") == request_id]

        return records(self.wait_for(lambda lines: bool(records(lines)), timeout))


def _pump(stream, into: list[str]) -> None:
    for line in stream:
        into.append(line.rstrip("\n"))


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("logging") / "config.yaml"  # JSON is YAML
    path.write_text(json.dumps({"models": [{
        "id": MODEL, "architecture": "vit_tiny_patch16_224", "weights": "random", "model_kwargs": TINY_VIT_KWARGS,
        "max_batch_size": 8, "max_wait_ms": 20.0,
    }]}))
    return path


@contextmanager
def start_server(config: Path, **env: str) -> Iterator[Server]:
    """`saliency-server serve` with the config and `env` (no SALIENCY_ or OTEL_ variable of this process), ready."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("SALIENCY_", "OTEL_"))}
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--config", str(config), "--port", str(port)],
        env={**environment, "SALIENCY_DRAIN_S": "0", **env}, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    server = Server(f"http://127.0.0.1:{port}", process)
    threads = [threading.Thread(target=_pump, args=(process.stderr, server.stderr), daemon=True),
               threading.Thread(target=_pump, args=(process.stdout, server.stdout), daemon=True)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(1200):
            try:
                if httpx.get(f"{server.url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, "\n".join(server.stderr)
            time.sleep(0.1)
        else:
            raise TimeoutError("the server never became ready:\n" + "\n".join(server.stderr))
        yield server
    finally:
        process.terminate()
        process.wait(30)
        for thread in threads:
            thread.join(5)


@pytest.fixture(scope="module")
def json_server(config_file: Path) -> Iterator[Server]:
    # a small body limit, to get the body-size middleware's 413 cheaply
    with start_server(config_file, SALIENCY_LOG_FORMAT="json", SALIENCY_MAX_BODY_BYTES="200000") as server:
        yield server


def predict(url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/models/{MODEL}/predict", headers=headers,
                      files={"file": ("x.png", png_bytes(random_image(3)), "image/png")})


def test_every_line_is_one_json_object_with_timestamp_level_logger_and_message(json_server: Server) -> None:
    predict(json_server.url)
    records = json_server.json_records()  # raises on a line that is not JSON
    assert records
    for record in records:
        assert {"timestamp", "level", "logger", "message"} <= set(record), record
        stamp = datetime.fromisoformat(record["timestamp"])
        assert stamp.tzinfo is not None and stamp.utcoffset().total_seconds() == 0, record
        assert record["level"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
    # uvicorn's own records (start-up) come through the same formatter
    assert any(r["logger"].startswith("uvicorn") and "Application startup complete" in r["message"] for r in records)


def test_a_prediction_writes_one_access_line_with_its_generated_request_id(json_server: Server) -> None:
    response = predict(json_server.url)
    assert response.status_code == 200, response.text
    request_id = response.headers["x-request-id"]
    assert GENERATED_ID.fullmatch(request_id), request_id
    [record] = json_server.access_records(request_id)
    assert record["level"] == "INFO"
    assert record["method"] == "POST" and record["path"] == f"/v1/models/{MODEL}/predict"
    assert record["endpoint"] == "predict" and record["model"] == MODEL
    assert record["status"] == 200 and record["code"] == ""
    assert re.fullmatch(r"127\.0\.0\.1:\d+", record["client"]), record
    assert record["duration_ms"] > 0 and record["queue_ms"] >= 0 and record["compute_ms"] > 0
    assert record["batch_size"] >= 1 and record["methods"] == []
    assert f"POST /v1/models/{MODEL}/predict 200" in record["message"]


def test_an_explanation_logs_its_methods(json_server: Server) -> None:
    response = httpx.post(f"{json_server.url}/v1/models/{MODEL}/explain", headers={"X-Request-ID": "explain-1"},
                          files={"file": ("x.png", png_bytes(random_image(4)), "image/png")},
                          data={"methods": json.dumps(["rollout", "gradcam"])}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "explain-1"
    [record] = json_server.access_records("explain-1")
    assert record["endpoint"] == "explain" and record["status"] == 200
    assert record["methods"] == ["rollout", "gradcam"]
    assert record["compute_ms"] > 0 and record["batch_size"] >= 1


@pytest.mark.parametrize(("request_id", "status", "code", "send"), [
    ("req-404.a", 404, "model_not_found", lambda url, h: httpx.get(f"{url}/v1/models/nope", headers=h)),
    ("9f1c2c4e-5b7a-4d2e-8f00-1234567890ab", 404, "not_found", lambda url, h: httpx.get(f"{url}/no/route", headers=h)),
    ("req-422", 422, "invalid_request",
     lambda url, h: httpx.post(f"{url}/v1/models/{MODEL}/predict", headers=h, data={"top_k": "-3"},
                               files={"file": ("x.png", png_bytes(random_image(5)), "image/png")})),
])
def test_a_client_request_id_is_echoed_in_the_header_the_error_body_and_the_log_line(
    json_server: Server, request_id: str, status: int, code: str, send: Callable,
) -> None:
    response = send(json_server.url, {"X-Request-ID": request_id})
    assert response.status_code == status, response.text
    assert response.headers["x-request-id"] == request_id
    assert response.json() == {"error": {"code": code, "message": response.json()["error"]["message"],
                                         "request_id": request_id}}
    [record] = json_server.access_records(request_id)
    assert (record["status"], record["code"]) == (status, code)


@pytest.mark.parametrize(("status", "code", "send"), [
    (413, "body_too_large", lambda url, h: httpx.post(f"{url}/v1/models/{MODEL}/predict", headers=h,
                                                       content=b"\0" * 300_000)),
    (414, "url_too_long", lambda url, h: httpx.get(f"{url}/v1/models?{'a' * 10_000}", headers=h)),
])
def test_errors_answered_before_the_app_runs_carry_the_request_id_too(
    json_server: Server, status: int, code: str, send: Callable,
) -> None:
    response = send(json_server.url, {"X-Request-ID": f"early-{status}"})
    assert response.status_code == status, response.text
    assert response.headers["x-request-id"] == f"early-{status}"
    assert response.json()["error"] == {"code": code, "message": response.json()["error"]["message"],
                                        "request_id": f"early-{status}"}
    [record] = json_server.access_records(f"early-{status}")
    assert (record["status"], record["code"]) == (status, code)


@pytest.mark.parametrize("unusable", ["two words", "x" * 129, "quote\"d", "tab\there"])
def test_an_unusable_client_request_id_is_replaced_by_a_generated_one(json_server: Server, unusable: str) -> None:
    response = httpx.get(f"{json_server.url}/v1/models/nope", headers={"X-Request-ID": unusable})
    generated = response.headers["x-request-id"]
    assert GENERATED_ID.fullmatch(generated), generated
    assert response.json()["error"]["request_id"] == generated
    [record] = json_server.access_records(generated)
    assert record["status"] == 404


def test_the_open_inference_protocol_keeps_its_error_shape_and_gets_the_header(json_server: Server) -> None:
    response = httpx.get(f"{json_server.url}/v2/models/nope", headers={"X-Request-ID": "v2-req"})
    assert response.status_code == 404
    assert response.headers["x-request-id"] == "v2-req"
    assert set(response.json()) == {"error"} and isinstance(response.json()["error"], str)


def test_health_probes_are_not_logged_at_info(json_server: Server) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{json_server.url}{path}", headers={"X-Request-ID": f"probe{path.replace('/', '-')}"}
                         ).status_code == 200
    httpx.get(f"{json_server.url}/v1/models", headers={"X-Request-ID": "after-probes"})
    json_server.access_records("after-probes")  # written after the probes' (had they been written)
    logged = {r.get("request_id") for r in json_server.json_records()}
    assert not {"probe-healthz", "probe-readyz", "probe-metrics"} & logged


def test_uvicorn_writes_no_access_line_of_its_own(json_server: Server) -> None:
    response = httpx.get(f"{json_server.url}/v1/models", headers={"X-Request-ID": "only-once"})
    assert response.status_code == 200
    json_server.access_records("only-once")
    records = json_server.json_records()
    assert not [r for r in records if r["logger"] == "uvicorn.access"]
    assert not [line for line in json_server.stdout + json_server.stderr if '"GET /v1/models HTTP/1.1"' in line]
    assert len([r for r in records if r.get("request_id") == "only-once"]) == 1
    assert json_server.stdout == []


def test_the_text_format_is_the_default_and_reads_as_one_line_per_record(config_file: Path) -> None:
    with start_server(config_file) as server:
        response = predict(server.url, {"X-Request-ID": "text-1"})
        assert response.status_code == 200
        lines = server.wait_for(lambda lines: any("[request_id=text-1]" in line for line in lines))
        [access] = [line for line in lines if "[request_id=text-1]" in line]
        assert re.fullmatch(
            r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO saliency\.access: 127\.0\.0\.1:\d+ POST "
            rf"/v1/models/{MODEL}/predict 200 [\d.]+ms model={MODEL} queue_ms=[\d.]+ compute_ms=[\d.]+ "
            r"batch_size=\d+ \[request_id=text-1\]", access), access
        assert any(re.fullmatch(r"\S+ \S+ INFO uvicorn\.error: Application startup complete\.", line)
                   for line in lines), lines
        assert not any(line.lstrip().startswith("{") for line in lines)
        assert server.stdout == []


def test_the_logging_config_names_one_formatter_per_format_and_silences_uvicorns_access_logger() -> None:
    for fmt, formatter in (("json", JsonLogFormatter), ("text", TextLogFormatter)):
        config = logging_config("info", fmt)
        assert config["formatters"]["default"]["()"] == f"{formatter.__module__}.{formatter.__qualname__}"
        assert config["loggers"]["uvicorn.access"] == {"handlers": [], "propagate": False}
        assert config["root"]["level"] == "INFO"
    assert logging_config("trace", "text")["root"]["level"] == "DEBUG"


@pytest.mark.anyio
async def test_an_unexpected_error_carries_the_request_id_in_its_header_body_and_logged_traceback() -> None:
    app = create_app(settings_for(tiny_vit_config()), models={})

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("kaboom")

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLogFormatter())
    logger = logging.getLogger("service.http.app")
    logger.addHandler(handler)
    try:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/boom", headers={"X-Request-ID": "boom-1"})
    finally:
        logger.removeHandler(handler)
    assert response.status_code == 500
    assert response.headers.get_list("x-request-id") == ["boom-1"]
    assert response.json()["error"]["code"] == "internal_error"
    assert response.json()["error"]["request_id"] == "boom-1"
    [record] = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert record["request_id"] == "boom-1" and record["level"] == "ERROR"
    assert "RuntimeError: kaboom" in record["exc_info"]
