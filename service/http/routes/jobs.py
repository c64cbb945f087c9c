"""Visualization jobs (`POST /v1/models/{model_id}/visualizations`, `GET/DELETE /v1/jobs/{job_id}`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path, Request, Response

from api_schemas import ErrorResponse, JobListResponse, JobStatus, VisualizationRequest
from service.http.dependencies import get_ready_model, get_state
from service.http.errors import (
    RETRY_AFTER_HEADER,
    ApiError,
    error_responses,
    invalid_request,
    shutting_down,
)
from service.http.openapi import json_request_body
from service.http.state import ServiceState
from service.http.uploads import read_json_request
from service.model.served import ServedModel
from service.visualization.jobs import (
    JobBudgetError,
    JobLimitError,
    JobsClosedError,
    check_job_cost,
)
from service.visualization.objective import ObjectiveError
from service.visualization.store import JobStoreError

router = APIRouter(tags=["visualization"])

JOB_ID = Path(description="Job id, as returned by POST /v1/models/{model_id}/visualizations.")


def _job_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    responses = error_responses(*(s for s in statuses if s not in (404, 429, 503)))
    if 404 in statuses:
        responses[404] = {"model": ErrorResponse, "description": "No such job (never created, forgotten, evicted or expired)."}
    if 429 in statuses:
        responses[429] = {"model": ErrorResponse,
                          "description": "`max_jobs` jobs are queued or running already (see Retry-After)."}
    if 503 in statuses:
        responses[503] = {"model": ErrorResponse, "description": JOB_STORE_DOWN}
    return responses


JOB_STORE_DOWN = "The job store (Redis, where `job_store` names one) cannot be reached (see Retry-After)."


def _job_not_found(job_id: str) -> ApiError:
    return ApiError(404, "job_not_found", f"no job {job_id!r}")


def _job_store_unavailable(exc: JobStoreError) -> ApiError:
    return ApiError(503, "job_store_unavailable", str(exc), {"Retry-After": "1"})


@router.post(
    "/v1/models/{model_id}/visualizations",
    response_model=JobStatus,
    status_code=202,
    summary="Start an activation-maximisation job",
    description="Optimises an input image to maximise a class logit or the mean activation of a module, a channel "
    "or a token. Returns at once with the job (status `queued`) and its URL in `Location`; poll GET /v1/jobs/{id} "
    "for progress and, once `succeeded`, the PNG and the objective curve. The objective is validated against the "
    "model first (unknown module, channel/token/class out of range: 422). Jobs run one step at a time on the "
    "model's device, between prediction batches.",
    responses={
        **error_responses(400, 404, 413, 415, 422, 500, 503),
        202: {"description": "The job was created; `Location` is its URL.",
              "headers": {"Location": {"description": "The job's URL: /v1/jobs/{id}.", "schema": {"type": "string"}}}},
        429: {"model": ErrorResponse, "description": "`max_jobs` jobs are queued or running already.",
              "headers": {"Retry-After": RETRY_AFTER_HEADER}},
    },
    # The body is read and validated by read_json_request: malformed JSON is 400 invalid_json, as on every route.
    openapi_extra=json_request_body(VisualizationRequest),
)
async def start_visualization(
    request: Request,
    response: Response,
    served: ServedModel = Depends(get_ready_model),
    state: ServiceState = Depends(get_state),
) -> JobStatus:
    body = await read_json_request(request, VisualizationRequest)
    try:
        check_job_cost(body, (served.input_size[1], served.input_size[2]), state.settings.job_cost_limit(served.config))
    except JobBudgetError as exc:
        raise ApiError(422, "over_budget", str(exc)) from None
    try:
        state.jobs.check_capacity()  # before the probe: no work for a request that will be refused
        objective, params = await state.jobs.prepare(served, body)
        job = await state.jobs.start(served, objective, params)
    except ObjectiveError as exc:
        raise invalid_request(str(exc)) from None
    except JobLimitError as exc:
        raise ApiError(429, "too_many_jobs", str(exc), {"Retry-After": "5"}) from None
    except JobsClosedError as exc:
        raise shutting_down(str(exc)) from None
    except JobStoreError as exc:
        raise _job_store_unavailable(exc) from None
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job.to_status()


@router.get(
    "/v1/jobs",
    response_model=JobListResponse,
    summary="Every job the server holds (without results)",
    description="With a shared job store (`job_store` naming Redis), every replica's jobs.",
    responses=_job_errors(503),
)
async def list_jobs(state: ServiceState = Depends(get_state)) -> JobListResponse:
    try:
        return JobListResponse(jobs=await state.jobs.statuses())
    except JobStoreError as exc:
        raise _job_store_unavailable(exc) from None


@router.get(
    "/v1/jobs/{job_id}",
    response_model=JobStatus,
    summary="A job's status, progress and result",
    responses=_job_errors(404, 503),
)
async def get_job(job_id: str = JOB_ID, state: ServiceState = Depends(get_state)) -> JobStatus:
    try:
        status = await state.jobs.status(job_id)
    except JobStoreError as exc:
        raise _job_store_unavailable(exc) from None
    if status is None:
        raise _job_not_found(job_id)
    return status


@router.delete(
    "/v1/jobs/{job_id}",
    response_model=JobStatus,
    summary="Cancel a job (or forget a finished one)",
    description="A queued or running job is cancelled: it stops before its next step and stays listed with status "
    "`cancelled`. A finished job (succeeded, failed or cancelled) is forgotten: its result is discarded and later "
    "requests for it get 404. Returns the job's status. With a shared job store, any replica cancels any job: the "
    "replica running it stops it before its next step or two.",
    responses=_job_errors(404, 503),
)
async def cancel_job(job_id: str = JOB_ID, state: ServiceState = Depends(get_state)) -> JobStatus:
    try:
        status = await state.jobs.cancel(job_id)
    except JobStoreError as exc:
        raise _job_store_unavailable(exc) from None
    if status is None:
        raise _job_not_found(job_id)
    return status
