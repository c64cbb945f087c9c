"""Property-based fuzzing of the OpenAPI document with schemathesis: every operation, with generated valid (positive)
and invalid (negative) requests, must answer without a server error and only with status codes the document declares.

Bounded and reproducible: a few examples per operation and mode, derandomized, no deadline (nothing here is timed).
A real uvicorn on loopback serves the app (tiny random models), so requests go through the production HTTP stack.
Path parameters named `model_id` are drawn from the served models as well as generated, so the model routes are
reached, not only their 404s.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import status_code_conformance  # noqa: E402

from service.http.app import create_app, load_models  # noqa: E402
from tests.helpers import settings_for, tiny_cnn_config, tiny_vit_config, uvicorn_in_thread  # noqa: E402

SETTINGS = settings_for(tiny_vit_config(), tiny_cnn_config(), device="cpu", max_jobs=2)
MODEL_IDS = [m.id for m in SETTINGS.models]
# The document needs no loaded model (the lifespan is not entered): operations are known at collection time.
SCHEMA = schemathesis.openapi.from_dict(create_app(SETTINGS, models={}).openapi())
OPERATIONS = {op.label: op for op in (result.ok() for result in SCHEMA.get_all_operations())}
# Invalid requests exist only for operations with a body: every other input is a free string (an id) or absent.
CASES = [(label, GenerationMode.POSITIVE) for label in sorted(OPERATIONS)] + [
    (label, GenerationMode.NEGATIVE) for label in sorted(OPERATIONS) if "requestBody" in OPERATIONS[label].definition.raw
]


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with uvicorn_in_thread(create_app(SETTINGS, models=load_models(SETTINGS))) as url:
        yield url


def test_the_document_lists_every_route_and_the_bodies_are_fuzzed_with_invalid_requests() -> None:
    assert {label for label, mode in CASES if mode is GenerationMode.NEGATIVE} == {
        "POST /v1/models/{model_id}/predict", "POST /v1/models/{model_id}/explain",
        "POST /v1/models/{model_id}/visualizations"}
    assert {"POST /v1/models/{model_id}/predict", "POST /v1/models/{model_id}/explain",
            "POST /v1/models/{model_id}/visualizations", "GET /healthz", "DELETE /v1/jobs/{job_id}"} <= set(OPERATIONS)


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label}-{mode.value}" for label, mode in CASES])
def test_every_operation_answers_without_server_errors_and_only_with_documented_statuses(
    label: str, mode: GenerationMode, base_url: str
) -> None:
    operation = OPERATIONS[label]
    strategy = operation.as_strategy(generation_mode=mode)
    seen: list[int] = []

    @given(case=strategy, model_id=st.sampled_from([*MODEL_IDS, None]))
    @settings(max_examples=10, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case: Any, model_id: str | None) -> None:
        if model_id is not None and case.path_parameters and "model_id" in case.path_parameters:
            case.path_parameters["model_id"] = model_id
        response = case.call_and_validate(base_url=base_url, checks=[not_a_server_error, status_code_conformance],
                                          timeout=120)
        seen.append(response.status_code)

    check()
    assert seen and all(status < 500 for status in seen), seen


def test_the_checks_fail_on_an_undocumented_status_and_on_a_server_error() -> None:
    """The property above can fail: the same checks reject a 418 the document does not list, and a 500."""
    from fastapi import FastAPI, HTTPException

    app = FastAPI()

    @app.get("/teapot")
    async def teapot() -> dict[str, str]:
        raise HTTPException(418)

    @app.get("/broken")
    async def broken() -> dict[str, str]:
        raise HTTPException(500)

    with uvicorn_in_thread(app) as url:
        operations = {op.label: op for op in (r.ok() for r in schemathesis.openapi.from_dict(app.openapi())
                                              .get_all_operations())}
        for label, expected in (("GET /teapot", "UndefinedStatusCode"), ("GET /broken", "ServerError")):
            case = operations[label].Case()
            with pytest.raises(FailureGroup) as failure:
                case.call_and_validate(base_url=url, checks=[not_a_server_error, status_code_conformance])
            assert expected in {type(e).__name__ for e in failure.value.exceptions}, failure.value
