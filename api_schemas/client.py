"""A typed Python client of the saliency-server HTTP API: `SaliencyClient` (sync) and `AsyncSaliencyClient` (async).

    from api_schemas.client import SaliencyClient

    with SaliencyClient("http://127.0.0.1:8000") as client:
        result = client.explain("docs/images/chelsea.jpg", "efficientnet_lite0", ["gradcam"],
                                output={"format": ["raw", "heatmap_png"]})
        saliency = result.map("gradcam").to_array()   # numpy float32 (height, width), NaN where unseen

Both clients share one implementation: each API method is built as a `_Call` (method, path, body, parser) by the
common base class, and the two classes only differ in the I/O that sends it (`httpx.Client` or `httpx.AsyncClient`)
and in how they sleep between polls. Every method returns the pydantic models of `api_schemas`; every non-2xx answer
raises `SaliencyError` (after retries, where it is retried). Transport failures (connection refused, timeouts)
propagate as httpx's own `httpx.TransportError` once retries are exhausted.

Images go as a multipart upload (`file` plus option fields, JSON text for `methods`, `target` and `output`), which
avoids base64's 33% overhead. A path or bytes are sent as they are; a PIL image or a numpy array is encoded as PNG
(see `api_schemas._images`). numpy and PIL are imported only when such an image or a map is converted.

Retries (`retries` attempts at most, within `retry_timeout` seconds in all):
- answers 503 (queue full, warming up, shutting down) and 429 (too many jobs) are retried, except 503
  `model_unavailable`, which the server sends for a model whose warm-up failed: that does not heal by waiting;
- any other answer (400, 404, 422, 500, 504...) is raised at once;
- transport errors are retried: any connection, timeout or network error for requests that are safe to repeat
  (reads, predictions, explanations), only errors before the request was sent (connect errors, pool timeouts) for
  those that are not (starting and cancelling a job: a repeated DELETE would forget the job the first cancelled).
- The wait before the next attempt is the answer's `Retry-After` (seconds, or an HTTP date) when it has one, else an
  exponential backoff with jitter (0.1 s, 0.2 s, 0.4 s... up to 5 s). A `Retry-After` longer than what remains of
  `retry_timeout` ends the retries at once (the error carries `retry_after`, so the caller can decide), instead of
  sleeping until the deadline to retry sooner than the server asked; a backoff is cut to what remains.

Why stamina: it is tenacity with safe defaults, instrumentation (logging, structlog, Prometheus counters of retries)
and a testing switch (`stamina.set_testing(True)` makes every wait zero, for callers' tests). Since 25.2 its `on`
"backoff hook" may return a float that replaces the backoff for that retry, which is exactly what honouring
`Retry-After` needs; the hook also sees the exception, so the retry decision and the wait are one function of it
(`_RetryPolicy.hook`). The attempt bound and the total time bound are stamina's `attempts` and `timeout`.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import math
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Generic, TypeVar, Union
from urllib.parse import quote

import httpx
import stamina
from pydantic import BaseModel, ValidationError

from api_schemas._images import EncodedImage, ImageInput, encode_image
from api_schemas.explain import (
    ExplainOptions,
    ExplainResponse,
    MethodListResponse,
    MethodSpec,
    OutputOptions,
    TopKTarget,
)
from api_schemas.health import HealthResponse, ReadinessResponse
from api_schemas.jobs import JobListResponse, JobStatus, VisualizationRequest
from api_schemas.models import ModelInfo, ModelListResponse
from api_schemas.predict import PredictOptions, PredictResponse

__all__ = ["AsyncSaliencyClient", "ImageInput", "JobTimeoutError", "SaliencyClient", "SaliencyError"]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 60.0
DEFAULT_RETRIES = 3
DEFAULT_RETRY_TIMEOUT = 30.0
USER_AGENT = f"saliency-api-schemas/0.1.0 httpx/{httpx.__version__}"

TERMINAL_JOB_STATES = frozenset({"succeeded", "failed", "cancelled"})
RETRIED_STATUSES = frozenset({429, 503})
PERMANENT_503_CODES = frozenset({"model_unavailable"})  # a failed warm-up: waiting does not help

# Safe to repeat: the request may or may not have reached the server.
RETRIED_TRANSPORT_ERRORS: tuple[type[Exception], ...] = (
    httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError,
)
# Raised before the request was sent: safe to repeat even for a request with effects.
UNSENT_TRANSPORT_ERRORS: tuple[type[Exception], ...] = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)

MethodInput = Union[str, MethodSpec, Mapping[str, Any]]
TargetInput = Union[str, int, TopKTarget, Mapping[str, Any]]


# --- errors -----------------------------------------------------------------------------------------------------


class SaliencyError(Exception):
    """A non-2xx answer of the server (after retries, for the answers that are retried).

    `code` and `message` are the server's error envelope `{"error": {"code", "message"}}`; an answer without one (a
    proxy's HTML page, the Open Inference Protocol's `{"error": "..."}`) gets the code `http_<status>` and its text
    as the message. `retry_after` is the answer's `Retry-After` in seconds (None without one); `response` the
    `httpx.Response` itself.
    """

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        retry_after: float | None = None,
        response: httpx.Response | None = None,
    ) -> None:
        super().__init__(status_code, code, message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.response = response

    def __str__(self) -> str:
        text = f"HTTP {self.status_code} {self.code}: {self.message}"
        if self.retry_after is not None:
            text += f" (Retry-After: {self.retry_after:g} s)"
        request = _request_of(self.response)
        if request is not None:
            text += f" [{request.method} {request.url}]"
        return text

    @property
    def retryable(self) -> bool:
        """Whether waiting and trying again may succeed: 429, and 503 but for a model that cannot serve at all."""
        return self.status_code in RETRIED_STATUSES and self.code not in PERMANENT_503_CODES

    @classmethod
    def from_response(cls, response: httpx.Response) -> "SaliencyError":
        status = response.status_code
        code, message = f"http_{status}", ""
        try:
            body = response.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and isinstance(error.get("code"), str):
            code, message = error["code"], str(error.get("message", ""))
        elif isinstance(error, str):  # the Open Inference Protocol's shape
            message = error
        else:
            message = response.text.strip()[:500] or response.reason_phrase
        return cls(status, code, message, parse_retry_after(response.headers.get("retry-after")), response)


class JobTimeoutError(TimeoutError):
    """`wait_for_job` gave up before the job finished; `job` is its last known status."""

    def __init__(self, message: str, job: JobStatus) -> None:
        super().__init__(message)
        self.job = job


def _request_of(response: httpx.Response | None) -> httpx.Request | None:
    if response is None:
        return None
    try:
        return response.request
    except RuntimeError:  # a response built by hand, without its request
        return None


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """`Retry-After` in seconds: delta-seconds (`"5"`) or an HTTP date (`"Wed, 21 Oct 2015 07:28:00 GMT"`, counted
    from `now`, never negative). None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


# --- retries ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RetryPolicy:
    attempts: int
    timeout: float
    wait_initial: float = 0.1
    wait_max: float = 5.0

    def context(self, call: "_Call[Any]") -> Any:
        """stamina's iterator of attempts for one call (sync or async)."""
        return stamina.retry_context(
            on=self.hook(call), attempts=self.attempts if call.retry else 1, timeout=self.timeout,
            wait_initial=self.wait_initial, wait_max=self.wait_max, wait_jitter=self.wait_initial,
        )

    def hook(self, call: "_Call[Any]") -> Callable[[Exception], bool | float]:
        """stamina's backoff hook for one call: False to raise the exception now, else the seconds to wait before
        the next attempt (the answer's Retry-After, or an exponential backoff), within the call's time bound."""
        started = time.monotonic()
        retried = 0
        transport_errors = RETRIED_TRANSPORT_ERRORS if call.idempotent else UNSENT_TRANSPORT_ERRORS

        def backoff(exc: Exception) -> bool | float:
            nonlocal retried
            if not call.retry:
                return False
            if isinstance(exc, SaliencyError):
                if not exc.retryable:
                    return False
                wait = exc.retry_after
            elif isinstance(exc, transport_errors):
                wait = None
            else:
                return False
            retried += 1
            remaining = self.timeout - (time.monotonic() - started)
            if wait is None:
                jitter = random.uniform(0.0, self.wait_initial)  # not cryptography
                wait = min(self.wait_max, self.wait_initial * 2 ** (retried - 1) + jitter, remaining)
            if remaining <= 0 or wait > remaining:
                return False
            return float(wait)

        return backoff


# --- requests and responses -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One API request and how to read its answer: built once, sent by either client (again on a retry)."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: Any = None
    data: dict[str, str] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None
    retry: bool = True
    idempotent: bool = True


def _expect(model: type[M]) -> Callable[[httpx.Response], M]:
    """A parser: the body as `model` for a 2xx answer, else SaliencyError."""

    def parse(response: httpx.Response) -> M:
        if not response.is_success:
            raise SaliencyError.from_response(response)
        return model.model_validate_json(response.content)

    return parse


def _readiness(response: httpx.Response) -> ReadinessResponse:
    """/readyz answers 503 with the same body while a model warms up: that is an answer, not an error."""
    if response.status_code in (200, 503):
        try:
            return ReadinessResponse.model_validate_json(response.content)
        except ValidationError:
            if response.status_code == 200:
                raise
    raise SaliencyError.from_response(response)


def _segment(value: str) -> str:
    return quote(str(value), safe="")


_FORM_JSON = re.compile(r"-?\d+")


def _form_safe(text: str) -> bool:
    """Whether the server reads this text form field back as the same string: it parses a field that looks like
    JSON (starts with `[` or `{`) or an integer as JSON, so the label "3" would become the class index 3."""
    stripped = text.strip()
    return not (stripped[:1] in ("[", "{") or _FORM_JSON.fullmatch(stripped))


def _image_call(path: str, image: ImageInput, options: BaseModel, parse: Callable[[httpx.Response], T]) -> _Call[T]:
    """A multipart upload: `file` and one text field per option set (strings as they are, anything else as JSON);
    the JSON form with a base64 `image` when a string option would not survive the form (see `_form_safe`)."""
    encoded: EncodedImage = encode_image(image)
    fields = options.model_dump(mode="json", exclude_unset=True)
    if all(_form_safe(v) for v in fields.values() if isinstance(v, str)):
        data = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
        files = {"file": (encoded.filename, encoded.data, encoded.content_type)}
        return _Call("POST", path, parse, data=data, files=files)
    body = {**fields, "image": base64.b64encode(encoded.data).decode("ascii")}
    return _Call("POST", path, parse, json=body)


def _method_list(methods: MethodInput | Sequence[MethodInput]) -> list[Any]:
    if isinstance(methods, (str, MethodSpec, Mapping)):
        return [methods]
    return list(methods)


class _JobWait:
    """When to poll a job again: the shared logic of both clients' wait_for_job."""

    def __init__(self, job_id: str, timeout: float, poll_interval: float) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, got {poll_interval}")
        self.job_id = job_id
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.deadline = time.monotonic() + timeout

    def next_wait(self, job: JobStatus) -> float | None:
        """None when the job has finished, else the seconds to sleep; JobTimeoutError past the deadline."""
        if job.status in TERMINAL_JOB_STATES:
            return None
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise JobTimeoutError(
                f"job {self.job_id!r} is still {job.status} (step {job.progress.step} of {job.progress.total}) "
                f"after {self.timeout:g} s", job,
            )
        return min(self.poll_interval, remaining)


class _ClientBase:
    """Configuration and request building, common to both clients."""

    def __init__(
        self,
        base_url: str | None,
        timeout: float | httpx.Timeout,
        retries: int,
        retry_timeout: float,
        headers: Mapping[str, str] | None,
        injected: bool,
        api_key: str | None = None,
    ) -> None:
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 1:
            raise ValueError(f"retries is the most attempts per request, at least 1; got {retries!r}")
        if not retry_timeout > 0:
            raise ValueError(f"retry_timeout must be positive seconds; got {retry_timeout!r}")
        if base_url is None and not injected:
            base_url = DEFAULT_BASE_URL
        self._base_url = "" if base_url is None else base_url.rstrip("/")
        self._timeout = timeout
        self._headers = {"user-agent": USER_AGENT, **(headers or {})}
        if api_key is not None:  # replaces an Authorization of `headers`
            self._headers = {k: v for k, v in self._headers.items() if k.lower() != "authorization"}
            self._headers["authorization"] = f"Bearer {api_key}"
        self._retry = _RetryPolicy(attempts=retries, timeout=float(retry_timeout))

    @property
    def base_url(self) -> str:
        return self._base_url

    def _request_kwargs(self, call: _Call[Any]) -> dict[str, Any]:
        return {
            "method": call.method, "url": self._base_url + call.path, "json": call.json, "data": call.data,
            "files": call.files, "headers": self._headers, "timeout": self._timeout,
        }

    # One builder per API method: everything but the I/O.

    def _health(self) -> _Call[HealthResponse]:
        return _Call("GET", "/healthz", _expect(HealthResponse))

    def _ready(self) -> _Call[ReadinessResponse]:
        # A probe: its answer is the point, so a 503 "not ready yet" is returned, not waited out.
        return _Call("GET", "/readyz", _readiness, retry=False)

    def _list_models(self) -> _Call[ModelListResponse]:
        return _Call("GET", "/v1/models", _expect(ModelListResponse))

    def _model_info(self, model: str) -> _Call[ModelInfo]:
        return _Call("GET", f"/v1/models/{_segment(model)}", _expect(ModelInfo))

    def _list_methods(self) -> _Call[MethodListResponse]:
        return _Call("GET", "/v1/methods", _expect(MethodListResponse))

    def _predict(self, image: ImageInput, model: str, top_k: int) -> _Call[PredictResponse]:
        options = PredictOptions.model_validate({"top_k": top_k})
        return _image_call(f"/v1/models/{_segment(model)}/predict", image, options, _expect(PredictResponse))

    def _explain(
        self,
        image: ImageInput,
        model: str,
        methods: MethodInput | Sequence[MethodInput],
        target: TargetInput,
        output: OutputOptions | Mapping[str, Any] | None,
        top_k: int,
    ) -> _Call[ExplainResponse]:
        fields: dict[str, Any] = {"methods": _method_list(methods), "target": target, "top_k": top_k}
        if output is not None:
            fields["output"] = output
        options = ExplainOptions.model_validate(fields)  # a malformed request fails here, before any upload
        return _image_call(f"/v1/models/{_segment(model)}/explain", image, options, _expect(ExplainResponse))

    def _start_visualization(
        self, model: str, request: VisualizationRequest | Mapping[str, Any]
    ) -> _Call[JobStatus]:
        body = VisualizationRequest.model_validate(request).model_dump(mode="json", exclude_unset=True)
        return _Call("POST", f"/v1/models/{_segment(model)}/visualizations", _expect(JobStatus), json=body,
                     idempotent=False)

    def _get_job(self, job_id: str) -> _Call[JobStatus]:
        return _Call("GET", f"/v1/jobs/{_segment(job_id)}", _expect(JobStatus))

    def _cancel_job(self, job_id: str) -> _Call[JobStatus]:
        return _Call("DELETE", f"/v1/jobs/{_segment(job_id)}", _expect(JobStatus), idempotent=False)

    def _list_jobs(self) -> _Call[JobListResponse]:
        return _Call("GET", "/v1/jobs", _expect(JobListResponse))


_CLIENT_ARGS = """
    Args:
        base_url: the server, e.g. "http://127.0.0.1:8000" (the default without `http_client`; with one, its own
            base_url applies unless this is given).
        timeout: seconds (or an `httpx.Timeout`) per HTTP request.
        retries: most attempts per request, the first included (1: never retry).
        retry_timeout: most seconds from the first attempt within which a retry may start.
        headers: sent with every request (tracing...).
        api_key: the server's API key, when it requires one: sent as `Authorization: Bearer KEY`.
        http_client: an httpx client to use (not closed by `close()`); else one is created, with `transport`.
        transport: the httpx transport of the client created (e.g. `httpx.MockTransport` in tests).
"""


class SaliencyClient(_ClientBase):
    __doc__ = "A synchronous client of the saliency-server API (thread-safe as httpx.Client is).\n" + _CLIENT_ARGS

    def __init__(
        self,
        base_url: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
        headers: Mapping[str, str] | None = None,
        http_client: httpx.Client | None = None,
        transport: httpx.BaseTransport | None = None,
        api_key: str | None = None,
    ) -> None:
        super().__init__(base_url, timeout, retries, retry_timeout, headers, injected=http_client is not None,
                         api_key=api_key)
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client(transport=transport)

    def _send(self, call: _Call[T]) -> T:
        for attempt in self._retry.context(call):
            with attempt:
                return call.parse(self._http.request(**self._request_kwargs(call)))
        raise AssertionError("unreachable: stamina raises the last error")

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> "SaliencyClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def health(self) -> HealthResponse:
        """GET /healthz: the process is alive."""
        return self._send(self._health())

    def ready(self) -> ReadinessResponse:
        """GET /readyz: whether every model is warm; a 503 "not yet" is returned as `ready=False`, not raised."""
        return self._send(self._ready())

    def wait_until_ready(self, timeout: float = 60.0, poll_interval: float = 0.2) -> ReadinessResponse:
        """Poll /readyz (connection errors included: the server may still be starting) until every model is warm;
        TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                readiness = self.ready()
                if readiness.ready:
                    return readiness
            except httpx.TransportError:
                readiness = None
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self._base_url or 'the server'} is not ready after {timeout:g} s: {readiness}")
            time.sleep(poll_interval)

    def list_models(self) -> ModelListResponse:
        """GET /v1/models."""
        return self._send(self._list_models())

    def model_info(self, model: str) -> ModelInfo:
        """GET /v1/models/{model}."""
        return self._send(self._model_info(model))

    def list_methods(self) -> MethodListResponse:
        """GET /v1/methods: every explanation method, its params schema and cost."""
        return self._send(self._list_methods())

    def predict(self, image: ImageInput, model: str, top_k: int = 5) -> PredictResponse:
        """POST /v1/models/{model}/predict: the `top_k` most probable classes."""
        return self._send(self._predict(image, model, top_k))

    def explain(
        self,
        image: ImageInput,
        model: str,
        methods: MethodInput | Sequence[MethodInput],
        target: TargetInput = "top1",
        output: OutputOptions | Mapping[str, Any] | None = None,
        top_k: int = 5,
    ) -> ExplainResponse:
        """POST /v1/models/{model}/explain: saliency maps of each method for `target` ("top1", a class index, a
        label, or {"top_k": k}); `output` chooses formats and space (default: heatmap PNGs on the original image).
        Options are validated before the upload (pydantic.ValidationError, a ValueError)."""
        return self._send(self._explain(image, model, methods, target, output, top_k))

    def start_visualization(self, model: str, request: VisualizationRequest | Mapping[str, Any]) -> JobStatus:
        """POST /v1/models/{model}/visualizations: start an activation-maximisation job (status `queued`)."""
        return self._send(self._start_visualization(model, request))

    def get_job(self, job_id: str) -> JobStatus:
        """GET /v1/jobs/{job_id}: status, progress and, once succeeded, the result."""
        return self._send(self._get_job(job_id))

    def cancel_job(self, job_id: str) -> JobStatus:
        """DELETE /v1/jobs/{job_id}: cancel a queued or running job; a finished job is forgotten instead."""
        return self._send(self._cancel_job(job_id))

    def list_jobs(self) -> JobListResponse:
        """GET /v1/jobs: every job the server holds, without results."""
        return self._send(self._list_jobs())

    def wait_for_job(self, job_id: str, timeout: float = 300.0, poll_interval: float = 0.5) -> JobStatus:
        """Poll the job until it has succeeded, failed or been cancelled, and return that status (with the result
        when it succeeded); JobTimeoutError (a TimeoutError) after `timeout` seconds."""
        wait = _JobWait(job_id, timeout, poll_interval)
        while (delay := wait.next_wait(job := self.get_job(job_id))) is not None:
            time.sleep(delay)
        return job


class AsyncSaliencyClient(_ClientBase):
    __doc__ = "An asyncio client of the saliency-server API.\n" + _CLIENT_ARGS

    def __init__(
        self,
        base_url: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
        headers: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        api_key: str | None = None,
    ) -> None:
        super().__init__(base_url, timeout, retries, retry_timeout, headers, injected=http_client is not None,
                         api_key=api_key)
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.AsyncClient(transport=transport)

    async def _send(self, call: _Call[T]) -> T:
        async for attempt in self._retry.context(call):
            with attempt:
                return call.parse(await self._http.request(**self._request_kwargs(call)))
        raise AssertionError("unreachable: stamina raises the last error")

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    close = aclose

    async def __aenter__(self) -> "AsyncSaliencyClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def health(self) -> HealthResponse:
        """GET /healthz: the process is alive."""
        return await self._send(self._health())

    async def ready(self) -> ReadinessResponse:
        """GET /readyz: whether every model is warm; a 503 "not yet" is returned as `ready=False`, not raised."""
        return await self._send(self._ready())

    async def wait_until_ready(self, timeout: float = 60.0, poll_interval: float = 0.2) -> ReadinessResponse:
        """Poll /readyz (connection errors included) until every model is warm; TimeoutError after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                readiness = await self.ready()
                if readiness.ready:
                    return readiness
            except httpx.TransportError:
                readiness = None
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self._base_url or 'the server'} is not ready after {timeout:g} s: {readiness}")
            await asyncio.sleep(poll_interval)

    async def list_models(self) -> ModelListResponse:
        """GET /v1/models."""
        return await self._send(self._list_models())

    async def model_info(self, model: str) -> ModelInfo:
        """GET /v1/models/{model}."""
        return await self._send(self._model_info(model))

    async def list_methods(self) -> MethodListResponse:
        """GET /v1/methods."""
        return await self._send(self._list_methods())

    async def predict(self, image: ImageInput, model: str, top_k: int = 5) -> PredictResponse:
        """POST /v1/models/{model}/predict (see SaliencyClient.predict)."""
        return await self._send(self._predict(image, model, top_k))

    async def explain(
        self,
        image: ImageInput,
        model: str,
        methods: MethodInput | Sequence[MethodInput],
        target: TargetInput = "top1",
        output: OutputOptions | Mapping[str, Any] | None = None,
        top_k: int = 5,
    ) -> ExplainResponse:
        """POST /v1/models/{model}/explain (see SaliencyClient.explain)."""
        return await self._send(self._explain(image, model, methods, target, output, top_k))

    async def start_visualization(self, model: str, request: VisualizationRequest | Mapping[str, Any]) -> JobStatus:
        """POST /v1/models/{model}/visualizations."""
        return await self._send(self._start_visualization(model, request))

    async def get_job(self, job_id: str) -> JobStatus:
        """GET /v1/jobs/{job_id}."""
        return await self._send(self._get_job(job_id))

    async def cancel_job(self, job_id: str) -> JobStatus:
        """DELETE /v1/jobs/{job_id}."""
        return await self._send(self._cancel_job(job_id))

    async def list_jobs(self) -> JobListResponse:
        """GET /v1/jobs."""
        return await self._send(self._list_jobs())

    async def wait_for_job(self, job_id: str, timeout: float = 300.0, poll_interval: float = 0.5) -> JobStatus:
        """Poll the job until it has finished (see SaliencyClient.wait_for_job)."""
        wait = _JobWait(job_id, timeout, poll_interval)
        while (delay := wait.next_wait(job := await self.get_job(job_id))) is not None:
            await asyncio.sleep(delay)
        return job
