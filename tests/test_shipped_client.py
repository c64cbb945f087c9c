"""The typed client shipped in `api_schemas` (`SaliencyClient`, `AsyncSaliencyClient`): every route against a live
uvicorn serving tiny random models, each kind of image, maps decoded to numpy and PIL, jobs, typed errors, retries
that honour Retry-After within their bounds (on a mock transport), and a distribution that needs no torch."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import subprocess
import sys
import time
import zipfile
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

import api_schemas
from api_schemas import ExplainResponse, JobStatus, MethodSpec, OutputOptions, TopKTarget
from api_schemas.client import AsyncSaliencyClient, JobTimeoutError, SaliencyClient, SaliencyError, parse_retry_after
from service.http.app import create_app, load_models
from tests.helpers import png_bytes, random_image, settings_for, tiny_cnn_config, tiny_vit_config, uvicorn_in_thread

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 10
LONG_STEPS = 10_000  # a job that only ends by cancellation
SETTINGS = settings_for(
    tiny_vit_config(max_job_cost=3.0 * LONG_STEPS), tiny_cnn_config(warmup_batch_sizes=[1]), device="cpu"
)
IMAGE = random_image(3)  # (40, 48, 3) uint8: 48 wide, 40 high
PNG = png_bytes(IMAGE)
RAW_AND_HEATMAP = {"format": ["raw", "heatmap_png"]}
CLASS_3 = {"type": "class", "index": 3}


# --- a live server ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with uvicorn_in_thread(create_app(SETTINGS, models=load_models(SETTINGS))) as base_url:
        with SaliencyClient(base_url) as client:
            client.wait_until_ready(timeout=60, poll_interval=0.05)
        yield base_url


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[SaliencyClient]:
    with SaliencyClient(url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def image_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "photo.png"
    path.write_bytes(PNG)
    return path


def plain_multipart_probabilities(url: str, model: str, data: bytes) -> np.ndarray:
    """Every class's probability from a hand-made multipart POST, without the client."""
    response = httpx.post(f"{url}/v1/models/{model}/predict", files={"file": ("x.png", data, "image/png")},
                          data={"top_k": str(CLASSES)}, timeout=30)
    assert response.status_code == 200, response.text
    return probabilities(response.json()["predictions"])


def probabilities(predictions: list[Any]) -> np.ndarray:
    got = np.zeros(CLASSES, dtype=np.float64)
    for p in predictions:
        index, probability = (p["index"], p["probability"]) if isinstance(p, dict) else (p.index, p.probability)
        got[index] = probability
    return got


# --- discovery ----------------------------------------------------------------------------------------------------


def test_health_and_readiness_of_a_warm_server(client: SaliencyClient) -> None:
    assert client.health().status == "ok"
    readiness = client.ready()
    assert readiness.ready is True and readiness.models == {"tiny_vit": True, "tiny_cnn": True}


def test_models_are_listed_and_described(client: SaliencyClient) -> None:
    listed = {m.id: m for m in client.list_models().models}
    assert set(listed) == {"tiny_vit", "tiny_cnn"}
    info = client.model_info("tiny_vit")
    assert info == listed["tiny_vit"]
    assert (info.family, info.input_size, info.num_classes, info.weights.random) == ("vit", [3, 32, 32], 10, True)
    assert client.model_info("tiny_cnn").family == "cnn"


def test_methods_are_listed_with_their_families(client: SaliencyClient) -> None:
    methods = {m.name: m for m in client.list_methods().methods}
    assert {"rollout", "gradcam", "saliency"} <= set(methods)
    assert methods["rollout"].families == ["vit"] and not methods["rollout"].class_specific
    assert set(methods["gradcam"].families) == {"vit", "cnn"} and methods["gradcam"].class_specific
    assert "properties" in methods["rollout"].params_schema


# --- predict ------------------------------------------------------------------------------------------------------


IMAGE_KINDS: dict[str, Callable[[Path], Any]] = {
    "path": lambda path: path,
    "str-path": lambda path: str(path),
    "bytes": lambda path: PNG,
    "pil": lambda path: Image.fromarray(IMAGE),
    "numpy-uint8": lambda path: IMAGE.copy(),
    "numpy-float": lambda path: IMAGE.astype(np.float32) / 255.0,
    "numpy-rgba": lambda path: np.dstack([IMAGE, np.full(IMAGE.shape[:2], 255, np.uint8)]),
}


@pytest.mark.parametrize("kind", list(IMAGE_KINDS))
def test_predict_accepts_each_kind_of_image_and_equals_a_plain_multipart_post(
    client: SaliencyClient, url: str, image_path: Path, kind: str
) -> None:
    """Every kind reaches the server as the same pixels (PNG is lossless; floats are scaled back exactly), so the
    probabilities are those of a hand-made multipart upload of the PNG."""
    response = client.predict(IMAGE_KINDS[kind](image_path), "tiny_vit", top_k=CLASSES)
    assert response.model_id == "tiny_vit" and len(response.predictions) == CLASSES
    np.testing.assert_allclose(probabilities(response.predictions),
                               plain_multipart_probabilities(url, "tiny_vit", PNG), atol=1e-5, rtol=0)


def test_predict_returns_top_k_classes_best_first(client: SaliencyClient) -> None:
    response = client.predict(PNG, "tiny_cnn", top_k=3)
    scores = [p.probability for p in response.predictions]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
    assert response.weights.random and response.timings.batch_size >= 1


def test_a_grayscale_array_is_sent_as_a_gray_png(client: SaliencyClient, url: str) -> None:
    gray = IMAGE[:, :, 0]
    response = client.predict(gray, "tiny_cnn", top_k=CLASSES)
    np.testing.assert_allclose(probabilities(response.predictions),
                               plain_multipart_probabilities(url, "tiny_cnn", png_bytes(gray)), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("image", "error", "words"),
    [
        (np.zeros((8, 8, 3), np.int64), TypeError, "uint8"),
        (np.zeros((8, 8, 2), np.uint8), ValueError, "shape"),
        (np.zeros((2, 8, 8, 3), np.uint8), ValueError, "shape"),
        (np.full((8, 8), 1.5), ValueError, "[0, 1]"),
        (np.full((8, 8), np.nan), ValueError, "NaN"),
        ([[0, 1], [1, 0]], TypeError, "numpy array"),
    ],
    ids=["int64", "two-channels", "four-dims", "float-out-of-range", "nan", "a-list"],
)
def test_an_unusable_image_is_refused_before_any_request(image: Any, error: type[Exception], words: str) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise AssertionError("nothing should be sent")

    with SaliencyClient("http://test", transport=httpx.MockTransport(refuse)) as client:
        with pytest.raises(error, match=None) as raised:
            client.predict(image, "tiny_vit")
    assert words in str(raised.value)


# --- explain ------------------------------------------------------------------------------------------------------


def test_explain_returns_raw_maps_as_numpy_and_heatmaps_as_pil_images(client: SaliencyClient, image_path: Path) -> None:
    response = client.explain(image_path, "tiny_vit", ["rollout", {"name": "gradcam"}], output=RAW_AND_HEATMAP)
    assert isinstance(response, ExplainResponse) and response.original_size == [48, 40]
    assert [r.method for r in response.explanations] == ["rollout", "gradcam"]
    assert response.method("gradcam").results[0].target.index == response.predictions[0].index  # "top1"
    assert response.method("rollout").results[0].target is None  # class-agnostic
    for method in ("rollout", "gradcam"):
        rendered = response.map(method)
        values = rendered.to_array()
        assert values.dtype == np.float32 and values.shape == (40, 48) == (rendered.height, rendered.width)
        seen = np.isfinite(values)
        assert seen.any() and not seen.all()  # the centre crop leaves the sides unseen (NaN)
        stats = rendered.statistics  # on the grid; bilinear upsampling stays within its range
        assert stats.min - 1e-5 <= float(np.nanmin(values)) <= float(np.nanmax(values)) <= stats.max + 1e-5
        heatmap = rendered.to_image("heatmap_png")
        assert heatmap.mode == "RGBA" and heatmap.size == (48, 40)
        np.testing.assert_array_equal(np.asarray(heatmap)[:, :, 3] == 0, ~seen)  # transparent exactly where unseen
        assert np.array_equal(response.method(method).results[0].to_array(), values, equal_nan=True)
    with pytest.raises(ValueError, match="overlay_png"):
        response.map("gradcam").to_image("overlay_png")
    with pytest.raises(KeyError, match="saliency"):
        response.method("saliency")


def test_a_map_without_raw_values_says_how_to_request_them(client: SaliencyClient) -> None:
    response = client.explain(PNG, "tiny_cnn", "gradcam", output=OutputOptions(format=["gray_png"], space="tokens"))
    rendered = response.map(0)
    assert response.space == "tokens" and rendered.to_image("gray_png").mode.startswith("I")
    with pytest.raises(ValueError, match="raw"):
        rendered.to_array()


def test_explain_targets_a_class_index_a_label_and_the_top_k(client: SaliencyClient) -> None:
    by_index = client.explain(PNG, "tiny_vit", ["gradcam"], target=3, output=RAW_AND_HEATMAP)
    assert [r.target.index for r in by_index.method("gradcam").results] == [3]
    label = by_index.method("gradcam").results[0].target.label
    by_label = client.explain(PNG, "tiny_vit", ["gradcam"], target=label, output=RAW_AND_HEATMAP)
    assert by_label.method("gradcam").results[0].target.index == 3
    np.testing.assert_allclose(by_label.map("gradcam").to_array(), by_index.map("gradcam").to_array(), atol=1e-5)
    for target in ({"top_k": 2}, TopKTarget(top_k=2)):
        top2 = client.explain(PNG, "tiny_vit", ["gradcam", "rollout"], target=target, output=RAW_AND_HEATMAP)
        gradcam = top2.method("gradcam")
        assert [r.target.index for r in gradcam.results] == [p.index for p in top2.predictions[:2]]
        second = top2.predictions[1].index
        assert gradcam.for_class(second) is gradcam.map(1)
        assert len(top2.method("rollout").results) == 1  # one map, whatever the target
        assert not np.array_equal(gradcam.map(0).to_array(), gradcam.map(1).to_array(), equal_nan=True)


def test_explain_passes_method_params_and_echoes_them(client: SaliencyClient) -> None:
    spec = MethodSpec(name="rollout", params={"head_fusion": "max", "discard_ratio": 0.5})
    response = client.explain(PNG, "tiny_vit", [spec], top_k=2)
    assert response.method("rollout").params["head_fusion"] == "max"
    assert response.method("rollout").params["discard_ratio"] == 0.5
    assert len(response.predictions) == 2 and response.map("rollout").heatmap_png  # the default format


# --- jobs -----------------------------------------------------------------------------------------------------------


def test_a_visualization_job_is_waited_for_until_it_succeeds(client: SaliencyClient) -> None:
    created = client.start_visualization("tiny_vit", {"objective": CLASS_3, "steps": 5, "jitter": 1})
    assert created.status in ("queued", "running") and created.params.steps == 5 and created.result is None
    assert created.id in {job.id for job in client.list_jobs().jobs}
    done = client.wait_for_job(created.id, timeout=30, poll_interval=0.02)
    assert done.status == "succeeded" and done.progress.step == 5 and done.result is not None
    assert len(done.result.objective_curve) == 5
    image = Image.open(io.BytesIO(base64.b64decode(done.result.image_png)))
    assert image.size == (32, 32) == (done.result.width, done.result.height)
    assert client.get_job(created.id).status == "succeeded"


def test_a_job_is_cancelled_listed_then_forgotten(client: SaliencyClient) -> None:
    from api_schemas import VisualizationRequest

    job = client.start_visualization("tiny_vit", VisualizationRequest(objective=CLASS_3, steps=LONG_STEPS))
    cancelled = client.cancel_job(job.id)
    assert cancelled.id == job.id and cancelled.status == "cancelled"
    listed = {j.id: j for j in client.list_jobs().jobs}
    assert listed[job.id].status == "cancelled" and listed[job.id].result is None
    assert client.wait_for_job(job.id, timeout=5).status == "cancelled"
    client.cancel_job(job.id)  # a finished job is forgotten
    with pytest.raises(SaliencyError) as raised:
        client.get_job(job.id)
    assert (raised.value.status_code, raised.value.code) == (404, "job_not_found")


def test_waiting_for_a_job_gives_up_at_its_timeout(client: SaliencyClient) -> None:
    job = client.start_visualization("tiny_vit", {"objective": CLASS_3, "steps": LONG_STEPS})
    try:
        started = time.monotonic()
        with pytest.raises(JobTimeoutError) as raised:
            client.wait_for_job(job.id, timeout=0.3, poll_interval=0.05)
        assert 0.3 <= time.monotonic() - started < 2.0
        assert raised.value.job.id == job.id and raised.value.job.status in ("queued", "running")
    finally:
        client.cancel_job(job.id)


# --- errors from the live server ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "status", "code"),
    [
        (lambda c: c.predict(PNG, "no_such_model"), 404, "model_not_found"),
        (lambda c: c.model_info("no_such_model"), 404, "model_not_found"),
        (lambda c: c.explain(PNG, "tiny_vit", ["no_such_method"]), 422, "invalid_request"),
        (lambda c: c.explain(PNG, "tiny_cnn", ["rollout"]), 422, "invalid_request"),  # a ViT-only method
        (lambda c: c.explain(PNG, "tiny_vit", ["gradcam"], target=99), 422, "invalid_request"),
        (lambda c: c.predict(b"not an image", "tiny_vit"), 400, "not_an_image"),
        (lambda c: c.get_job("no_such_job"), 404, "job_not_found"),
        (lambda c: c.start_visualization("tiny_vit", {"objective": {"type": "class", "index": 99}}), 422,
         "invalid_request"),
    ],
    ids=["unknown-model", "unknown-model-info", "unknown-method", "method-of-another-family", "class-out-of-range",
         "not-an-image", "unknown-job", "objective-out-of-range"],
)
def test_an_error_answer_raises_a_typed_saliency_error(client: SaliencyClient, call: Any, status: int,
                                                        code: str) -> None:
    with pytest.raises(SaliencyError) as raised:
        call(client)
    error = raised.value
    assert (error.status_code, error.code, error.retry_after) == (status, code, None)
    assert error.message and error.response.status_code == status
    assert str(error).startswith(f"HTTP {status} {code}: {error.message}") and str(error).endswith("]")


def test_options_the_schema_refuses_fail_before_any_upload(client: SaliencyClient) -> None:
    with pytest.raises(ValidationError, match="target"):
        client.explain(PNG, "tiny_vit", ["gradcam"], target=True)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="top_k"):
        client.predict(PNG, "tiny_vit", top_k=0)
    with pytest.raises(ValidationError, match="format"):
        client.explain(PNG, "tiny_vit", ["gradcam"], output={"format": ["jpeg"]})


# --- the async client ---------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_async_client_covers_the_same_api(url: str, image_path: Path) -> None:
    async with AsyncSaliencyClient(url, timeout=30) as client:
        assert (await client.health()).status == "ok"
        assert (await client.ready()).ready
        assert {m.id for m in (await client.list_models()).models} == {"tiny_vit", "tiny_cnn"}
        assert (await client.model_info("tiny_cnn")).family == "cnn"
        assert "rollout" in {m.name for m in (await client.list_methods()).methods}
        reference = plain_multipart_probabilities(url, "tiny_vit", PNG)
        kinds = [IMAGE_KINDS[k](image_path) for k in ("path", "bytes", "pil", "numpy-uint8", "numpy-float")]
        predicted = await asyncio.gather(*(client.predict(k, "tiny_vit", top_k=CLASSES) for k in kinds))
        for response in predicted:
            np.testing.assert_allclose(probabilities(response.predictions), reference, atol=1e-5, rtol=0)
        explained = await client.explain(IMAGE, "tiny_vit", ["rollout", "gradcam"], target={"top_k": 2},
                                         output=RAW_AND_HEATMAP)
        assert explained.map("rollout").to_array().shape == (40, 48)
        assert [r.target.index for r in explained.method("gradcam").results] == \
            [p.index for p in explained.predictions[:2]]
        assert explained.map("gradcam", 1).to_image().size == (48, 40)
        job = await client.start_visualization("tiny_vit", {"objective": CLASS_3, "steps": 3})
        done = await client.wait_for_job(job.id, timeout=30, poll_interval=0.02)
        assert done.status == "succeeded" and len(done.result.objective_curve) == 3
        long = await client.start_visualization("tiny_vit", {"objective": CLASS_3, "steps": LONG_STEPS})
        assert (await client.cancel_job(long.id)).status == "cancelled"
        assert {job.id, long.id} <= {j.id for j in (await client.list_jobs()).jobs}
        with pytest.raises(SaliencyError) as raised:
            await client.explain(PNG, "tiny_vit", ["no_such_method"])
        assert (raised.value.status_code, raised.value.code) == (422, "invalid_request")
        with pytest.raises(SaliencyError) as raised:
            await client.get_job("no_such_job")
        assert (raised.value.status_code, raised.value.code) == (404, "job_not_found")


# --- retries, on a mock transport -----------------------------------------------------------------------------------


HEALTHY = {"status": "ok"}


def error_body(code: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": f"the {code} message"}}


class Script:
    """A mock server answering from a list (the last answer repeats), recording when each request came."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []
        self.times: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.times.append(time.monotonic())
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def client(self, **kwargs: Any) -> SaliencyClient:
        return SaliencyClient("http://test", transport=httpx.MockTransport(self), **kwargs)

    def async_client(self, **kwargs: Any) -> AsyncSaliencyClient:
        return AsyncSaliencyClient("http://test", transport=httpx.MockTransport(self), **kwargs)


def answer(status: int, body: Any = None, retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return httpx.Response(status, json=HEALTHY if body is None else body, headers=headers)


def test_a_503_is_retried_after_its_retry_after() -> None:
    script = Script(answer(503, error_body("queue_full"), "1"), answer(200))
    with script.client() as client:
        assert client.health().status == "ok"
    assert len(script.requests) == 2
    assert 0.95 <= script.times[1] - script.times[0] < 1.6


@pytest.mark.anyio
async def test_the_async_client_waits_the_retry_after_too() -> None:
    script = Script(answer(429, error_body("too_many_jobs"), "1"), answer(200))
    async with script.async_client() as client:
        assert (await client.health()).status == "ok"
    assert len(script.requests) == 2
    assert 0.95 <= script.times[1] - script.times[0] < 1.6


def test_a_retry_after_date_is_honoured_too() -> None:
    now = datetime(2015, 10, 21, 7, 27, 57, tzinfo=timezone.utc)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now) == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now) == 0.0  # in the past: at once
    assert parse_retry_after("2", now) == 2.0 and parse_retry_after(" 0 ", now) == 0.0
    assert parse_retry_after("soon", now) is None and parse_retry_after("-1", now) is None
    assert parse_retry_after(None) is None
    when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=2), usegmt=True)
    script = Script(answer(503, error_body("model_warming_up"), when), answer(200))
    with script.client() as client:
        client.health()
    assert 0.5 <= script.times[1] - script.times[0] < 2.6  # the date has whole seconds


def test_attempts_are_bounded_and_the_last_error_carries_its_code_and_retry_after() -> None:
    script = Script(answer(503, error_body("queue_full"), "0"))
    with script.client(retries=4) as client:
        with pytest.raises(SaliencyError) as raised:
            client.predict(PNG, "m")
    assert len(script.requests) == 4
    error = raised.value
    assert (error.status_code, error.code, error.retry_after) == (503, "queue_full", 0.0)
    assert "Retry-After: 0 s" in str(error) and "POST http://test/v1/models/m/predict" in str(error)


def test_a_retry_after_beyond_the_retry_timeout_gives_up_at_once() -> None:
    script = Script(answer(503, error_body("shutting_down"), "30"), answer(200))
    started = time.monotonic()
    with script.client(retry_timeout=5) as client:
        with pytest.raises(SaliencyError) as raised:
            client.health()
    assert time.monotonic() - started < 0.5 and len(script.requests) == 1
    assert (raised.value.code, raised.value.retry_after) == ("shutting_down", 30.0)


def test_backoff_without_retry_after_stays_within_the_retry_timeout() -> None:
    script = Script(answer(503, "<html>busy</html>"))
    started = time.monotonic()
    with script.client(retries=100, retry_timeout=0.5) as client:
        with pytest.raises(SaliencyError) as raised:
            client.health()
    assert time.monotonic() - started < 1.0 and 2 <= len(script.requests) < 100
    assert (raised.value.code, raised.value.message, raised.value.retry_after) == ("http_503", '"<html>busy</html>"',
                                                                                  None)


@pytest.mark.parametrize(
    ("status", "code"),
    [(400, "not_an_image"), (404, "model_not_found"), (422, "invalid_request"), (500, "inference_failed"),
     (504, "timeout"), (503, "model_unavailable")],
)
def test_other_errors_are_not_retried(status: int, code: str) -> None:
    script = Script(answer(status, error_body(code), "0"), answer(200))
    with script.client() as client:
        with pytest.raises(SaliencyError) as raised:
            client.predict(PNG, "m")
    assert len(script.requests) == 1
    assert (raised.value.status_code, raised.value.code, raised.value.message) == (status, code, f"the {code} message")


def test_an_answer_without_the_error_envelope_gets_an_http_code() -> None:
    script = Script(httpx.Response(502, text="<html>Bad Gateway</html>"))
    with script.client() as client:
        with pytest.raises(SaliencyError) as raised:
            client.list_models()
    assert (raised.value.status_code, raised.value.code, raised.value.message) == (
        502, "http_502", "<html>Bad Gateway</html>")


def test_readiness_answers_not_ready_without_raising_or_retrying() -> None:
    script = Script(answer(503, {"ready": False, "models": {"a": True, "b": False}}, "1"))
    with script.client() as client:
        readiness = client.ready()
    assert readiness.ready is False and readiness.models == {"a": True, "b": False}
    assert len(script.requests) == 1


def test_connection_errors_are_retried() -> None:
    script = Script(httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), answer(200))
    with script.client() as client:
        assert client.health().status == "ok"
    assert len(script.requests) == 3


def test_starting_a_job_is_repeated_only_when_it_was_never_sent() -> None:
    job = JobStatus.model_validate({
        "id": "j", "model_id": "m", "status": "queued", "progress": {"step": 0, "total": 5},
        "params": {"objective": CLASS_3, "steps": 5}, "created_at": "2025-01-01T00:00:00Z",
    }).model_dump(mode="json")
    unsent = Script(httpx.ConnectError("refused"), answer(202, job))
    with unsent.client() as client:
        assert client.start_visualization("m", {"objective": CLASS_3, "steps": 5}).id == "j"
    assert len(unsent.requests) == 2
    maybe_sent = Script(httpx.ReadError("reset"), answer(202, job))
    with maybe_sent.client() as client:
        with pytest.raises(httpx.ReadError):
            client.start_visualization("m", {"objective": CLASS_3, "steps": 5})
    assert len(maybe_sent.requests) == 1


def test_the_upload_is_multipart_with_json_text_options() -> None:
    script = Script(httpx.Response(500, json=error_body("inference_failed")))
    with script.client() as client:
        with pytest.raises(SaliencyError):
            client.explain(PNG, "m", ["rollout", MethodSpec(name="gradcam")], target={"top_k": 2},
                           output={"format": ["raw"]}, top_k=3)
    request = script.requests[0]
    assert request.headers["content-type"].startswith("multipart/form-data")
    fields = multipart_fields(request)
    assert fields["file"] == PNG
    assert json.loads(fields["methods"]) == ["rollout", {"name": "gradcam"}]
    assert json.loads(fields["target"]) == {"top_k": 2} and json.loads(fields["output"]) == {"format": ["raw"]}
    assert fields["top_k"] == b"3"


def test_a_label_that_looks_like_json_goes_in_a_json_body() -> None:
    """A form field "3" would be read as the class index 3: the label "3" is sent in the JSON form instead."""
    script = Script(httpx.Response(500, json=error_body("inference_failed")))
    with script.client() as client:
        for target in ("3", "top1"):
            with pytest.raises(SaliencyError):
                client.explain(PNG, "m", "gradcam", target=target)
    as_json, as_form = script.requests
    assert as_json.headers["content-type"] == "application/json"
    body = json.loads(as_json.content)
    assert body["target"] == "3" and base64.b64decode(body["image"]) == PNG
    assert multipart_fields(as_form)["target"] == b"top1"


def multipart_fields(request: httpx.Request) -> dict[str, bytes]:
    """The parts of a multipart body by name (enough of RFC 7578 for httpx's own encoding)."""
    boundary = request.headers["content-type"].split("boundary=")[1].encode()
    fields = {}
    for part in request.content.split(b"--" + boundary)[1:-1]:
        head, _, value = part.partition(b"\r\n\r\n")
        name = head.split(b'name="')[1].split(b'"')[0].decode()
        fields[name] = value.removesuffix(b"\r\n")
    return fields


# --- packaging: no torch ------------------------------------------------------------------------------------------


def test_the_client_predicts_without_importing_torch_or_the_server(url: str, image_path: Path) -> None:
    code = (
        "import sys\n"
        "from api_schemas.client import SaliencyClient\n"
        f"with SaliencyClient({url!r}) as client:\n"
        f"    response = client.predict(open({str(image_path)!r}, 'rb').read(), 'tiny_cnn', top_k=3)\n"
        "print(len(response.predictions))\n"
        "print(','.join(m for m in ('torch', 'timm', 'service', 'fastapi', 'numpy', 'PIL') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["3", ""]


def test_importing_the_package_does_not_load_the_client() -> None:
    code = "import sys, api_schemas; print('httpx' in sys.modules); print(api_schemas.SaliencyClient.__module__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.split() == ["False", "api_schemas.client"]
    assert api_schemas.SaliencyError is SaliencyError


def test_the_wheel_holds_the_package_alone_and_requires_no_torch(tmp_path: Path) -> None:
    source = tmp_path / "api_schemas"  # a copy: an in-tree build would leave build/ and *.egg-info behind
    shutil.copytree(ROOT / "api_schemas", source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source), "-w",
         str(tmp_path / "dist")], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("saliency_api_schemas-0.1.0-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read("saliency_api_schemas-0.1.0.dist-info/METADATA").decode()
    package = {n for n in names if not n.startswith("saliency_api_schemas-0.1.0.dist-info/")}
    expected = {f"api_schemas/{p.name}" for p in (ROOT / "api_schemas").glob("*.py")} | {"api_schemas/py.typed"}
    assert package == expected
    requires = {line.split(":", 1)[1].strip().split(";")[0] for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")}
    names_required = {r.split("<")[0].split(">")[0].split("=")[0].split("[")[0].strip().lower() for r in requires}
    assert names_required == {"pydantic", "httpx", "stamina", "numpy", "pillow"}
    assert "Requires-Python: >=3.11" in metadata and "Name: saliency-api-schemas" in metadata
