"""Visualization jobs: a bounded set of asyncio tasks, each running its optimisation one step at a time.

Every step is one call on the first lane of the model's device (`loop.run_in_executor`), so prediction batches
given that lane run between steps (a CPU's other lane keeps serving meanwhile): a job slows the queue by at most one
step per active job, never more. Steps, the shape probe and the final forward pass all run on that lane; only the
PNG encoding runs elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import numpy as np
import torch

from api_schemas import (
    ErrorDetail,
    JobProgress,
    JobStatus,
    VisualizationRequest,
    VisualizationResult,
)
from service.model.served import ServedModel
from service.png import png_base64
from service.visualization.objective import Objective, ObjectiveError
from service.visualization.optimizer import ActivationMaximizer, OptimizationSettings
from service.visualization.store import (
    ACTIVE,
    JobStore,
    JobStoreError,
    MemoryJobStore,
    replica_lost_error,
)

log = logging.getLogger(__name__)


class DeviceExecutors(Protocol):
    """Where a device's work runs (`service.runtime.devices.DeviceWorkers`): its first lane."""

    def for_device(self, device: torch.device) -> Executor: ...


STEP_COST = 3.0  # forward passes' worth of one optimisation step (a forward and a backward pass) at the input size


class JobBudgetError(ValueError):
    """A job would cost more than the model's max_job_cost; the message names the estimate, the limit and why."""


def job_cost(request: VisualizationRequest, input_size: tuple[int, int]) -> tuple[float, str]:
    """A job's cost in forward passes of the model and how it was reached: STEP_COST per step, scaled by the area
    of the optimised image relative to the model's (height, width) input size."""
    height, width = request.size if request.size is not None else input_size
    area = height * width / (input_size[0] * input_size[1])
    basis = f"{STEP_COST:g} x steps={request.steps} x size {height}x{width} / input {input_size[0]}x{input_size[1]}"
    return STEP_COST * request.steps * area, basis


def check_job_cost(request: VisualizationRequest, input_size: tuple[int, int], limit: float) -> None:
    cost, basis = job_cost(request, input_size)
    if cost > limit:
        raise JobBudgetError(f"estimated cost {cost:.4g} forward passes ({basis}) exceeds this model's max_job_cost "
                             f"{limit:g}; lower steps or size")


class JobLimitError(RuntimeError):
    """`max_jobs` jobs are queued or running already."""


class JobsClosedError(RuntimeError):
    """The server is shutting down and accepts no new jobs."""


def _now() -> datetime:
    return datetime.now(UTC)


def encode_png(image: np.ndarray) -> str:
    """base64 PNG of uint8 (H, W, C) pixels: RGB from the first 3 channels, grayscale for fewer."""
    return png_base64(np.ascontiguousarray(image[:, :, :3]) if image.shape[2] >= 3 else image[:, :, 0])


@dataclass
class VisualizationJob:
    """One job as the server holds it. Only the event loop changes it."""

    id: str
    model_id: str
    params: VisualizationRequest
    created_at: datetime = field(default_factory=_now)
    status: str = "queued"
    step: int = 0
    objective: float | None = None
    curve: list[float] = field(default_factory=list)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: ErrorDetail | None = None
    result: VisualizationResult | None = None
    task: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def mark_running(self) -> None:
        if self.status == "queued":
            self.status = "running"
            self.started_at = _now()

    def record(self, value: float) -> None:
        if self.active:
            self.step += 1
            self.objective = value
            self.curve.append(value)

    def finish(self, status: str, *, error: ErrorDetail | None = None,
               result: VisualizationResult | None = None) -> None:
        if self.active:
            self.status = status
            self.error = error
            self.result = result
            self.finished_at = _now()

    def to_status(self, include_result: bool = True) -> JobStatus:
        return JobStatus(
            id=self.id,
            model_id=self.model_id,
            status=self.status,  # type: ignore[arg-type]
            progress=JobProgress(step=self.step, total=self.params.steps, objective=self.objective),
            params=self.params,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            error=self.error,
            result=self.result if include_result else None,
        )


class JobManager:
    """Creates, runs, cancels and retains visualization jobs.

    The jobs this process runs are held here (`max_jobs` counts them: a per-process limit); their records live in
    the store (`store.py`): this process's memory by default, or Redis, shared by every replica, where any replica
    answers for any job and cancels it through its record.
    """

    def __init__(self, workers: DeviceExecutors, encode_pool: Executor, max_jobs: int, max_finished_jobs: int,
                 observe_step: Callable[[str, float, float], None] | None = None,
                 store: JobStore | None = None) -> None:
        self._workers = workers
        # Told (model id, seconds the step waited for the device, seconds it computed) after each step.
        self._observe_step = observe_step
        self._encode_pool = encode_pool
        self.max_jobs = max_jobs
        self.max_finished_jobs = max_finished_jobs
        self.store: JobStore = store if store is not None else MemoryJobStore(max_finished_jobs)
        self._local: dict[str, VisualizationJob] = {}  # the active jobs this process runs
        self._shapes: dict[tuple[str, str | None, tuple[int, int]], tuple[int, ...]] = {}
        self._closed = False
        self._heartbeat: asyncio.Task[None] | None = None
        self._unsynced: set[str] = set()  # jobs whose latest progress write failed (logged once)

    def state_counts(self) -> dict[str, int]:
        """Jobs held per status (with a shared store: the jobs this process runs)."""
        return self.store.state_counts(self._local.values())

    @property
    def active_count(self) -> int:
        return sum(1 for job in self._local.values() if job.active)

    def check_capacity(self) -> None:
        if self._closed:
            raise JobsClosedError("the server is shutting down")
        if self.active_count >= self.max_jobs:
            raise JobLimitError(f"{self.max_jobs} visualization jobs are queued or running already (the limit); "
                                "wait for one to finish or cancel one")

    async def prepare(
        self, served: ServedModel, request: VisualizationRequest
    ) -> tuple[Objective, VisualizationRequest]:
        """Validate the request against the model (a shape probe on the device's first lane where needed).

        Returns the objective and the request with its size filled in; raises ObjectiveError naming the field.
        """
        objective = Objective(request.objective)
        names = frozenset(name for name, _ in served.active_network.named_modules() if name)
        objective.check_static(names, served.num_classes)
        default = (served.input_size[1], served.input_size[2])
        size = (request.size[0], request.size[1]) if request.size is not None else default
        if objective.layer is not None or size != default:
            shape = await self._probe(served, objective, size, custom_size=size != default)
            objective.check_output_shape(shape)
        return objective, request.model_copy(update={"size": list(size)})

    async def _probe(self, served: ServedModel, objective: Objective, size: tuple[int, int],
                     custom_size: bool) -> tuple[int, ...]:
        key = (served.id, objective.layer, size)
        if key in self._shapes:
            return self._shapes[key]

        def probe() -> tuple[int, ...]:
            x = torch.zeros((1, served.input_size[0], *size), device=served.device, dtype=served.dtype)
            return objective.bind(served.active_network).probe(x)

        try:
            shape = await asyncio.get_running_loop().run_in_executor(self._workers.for_device(served.device), probe)
        except ObjectiveError:
            raise
        except Exception as exc:
            if not custom_size:
                raise
            raise ObjectiveError(
                f"size: the model cannot take a {size[0]}x{size[1]} input ({type(exc).__name__}: {exc})"
            ) from None
        if len(self._shapes) > 256:
            self._shapes.clear()
        self._shapes[key] = shape
        return shape

    async def start(self, served: ServedModel, objective: Objective,
                    params: VisualizationRequest) -> VisualizationJob:
        """Create the job (its record first) and its task; raises JobLimitError when `max_jobs` are active here,
        JobStoreError when the store cannot record it."""
        self.check_capacity()
        job = VisualizationJob(id=uuid.uuid4().hex, model_id=served.id, params=params)
        self._local[job.id] = job  # counted from now on: concurrent starts see it
        try:
            await self.store.add(job)
        except BaseException:
            del self._local[job.id]
            raise
        if self._closed:  # shut down while the record was written
            job.finish("cancelled", error=ErrorDetail(code="shutting_down", message="the server shut down"))
            await self._finished(job)
            raise JobsClosedError("the server is shutting down")
        job.task = asyncio.get_running_loop().create_task(self._run(job, served, objective),
                                                          name=f"visualization-{job.id}")
        if self.store.shared and self._heartbeat is None:
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat(), name="visualization-heartbeat")
        return job

    def get(self, job_id: str) -> VisualizationJob | None:
        """The job object, where this process holds it (running here, or kept by the memory store)."""
        job = self._local.get(job_id)
        if job is None and isinstance(self.store, MemoryJobStore):
            job = self.store.held(job_id)
        return job

    async def status(self, job_id: str) -> JobStatus | None:
        """The job's status and result, from the store; None when unknown."""
        return await self.store.get(job_id)

    async def statuses(self) -> list[JobStatus]:
        """Every job the store holds, oldest first, without results."""
        return await self.store.list()

    async def cancel(self, job_id: str) -> JobStatus | None:
        """Cancel an active job (it stays listed as cancelled); forget a finished one. None when unknown.

        A job running here stops at once; one running on another replica is cancelled through its record, and
        its replica stops it before its next step or two."""
        job = self._local.get(job_id)
        if job is None or not job.active:
            return await self.store.cancel(job_id)
        job.finish("cancelled")
        if job.task is not None:
            job.task.cancel()
        await self._finished(job)
        return job.to_status()

    async def shutdown(self) -> None:
        """Refuse new jobs, cancel active ones and wait for their tasks to end."""
        self._closed = True
        jobs, tasks = list(self._local.values()), []
        for job in jobs:
            if job.active:
                job.finish("cancelled", error=ErrorDetail(code="shutting_down", message="the server shut down"))
            if job.task is not None and not job.task.done():
                job.task.cancel()
                tasks.append(job.task)
        await asyncio.gather(*tasks, return_exceptions=True)
        for job in jobs:  # a task cancelled before it started never recorded its end
            await self._finished(job)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        await self.store.close()

    async def _finished(self, job: VisualizationJob) -> None:
        """Record a finished job in the store and stop holding it here."""
        try:
            await self.store.finish(job)
        except JobStoreError:
            log.exception("visualization job %s ended %s but its record could not be updated", job.id, job.status)
        finally:
            self._local.pop(job.id, None)
            self._unsynced.discard(job.id)

    async def _sync(self, job: VisualizationJob) -> bool:
        """Record the progress; False when the job was cancelled (or declared lost) elsewhere: stop it."""
        try:
            stored = await self.store.sync(job)
        except JobStoreError as exc:
            if job.id not in self._unsynced:
                self._unsynced.add(job.id)
                log.warning("visualization job %s: progress not recorded (%s); it keeps running", job.id, exc)
            return True
        self._unsynced.discard(job.id)
        if stored in ACTIVE:
            return True
        if stored == "failed":
            job.finish("failed", error=replica_lost_error())
        else:  # cancelled elsewhere, or its record is gone
            job.finish("cancelled")
        log.info("visualization job %s on %r stopped at step %d: %s elsewhere", job.id, job.model_id, job.step,
                 stored or "forgotten")
        return False

    async def _beat(self) -> None:
        """Tell the store every `heartbeat_s` that this process still runs its active jobs."""
        failing = False
        while True:
            try:
                await self.store.heartbeat([job for job in self._local.values() if job.active])
            except JobStoreError as exc:
                if not failing:  # once per outage
                    log.warning("visualization job heartbeats failing (other replicas will declare this one's jobs "
                                "lost if it lasts): %s", exc)
                failing = True
            else:
                if failing:
                    log.info("visualization job heartbeats recorded again")
                failing = False
            await asyncio.sleep(self.store.heartbeat_s)

    async def _run(self, job: VisualizationJob, served: ServedModel, objective: Objective) -> None:
        loop = asyncio.get_running_loop()
        executor = self._workers.for_device(served.device)
        params = job.params
        assert params.size is not None
        channels = served.input_size[0]
        mean, std = tuple(served.data_config["mean"]), tuple(served.data_config["std"])
        if len(mean) != channels:
            mean, std = (mean[0],) * channels, (std[0],) * channels
        maximizer = ActivationMaximizer(
            served.active_network, served.device, served.dtype, mean, std, objective,
            OptimizationSettings(
                steps=params.steps, lr=params.lr, l2_weight=params.l2_weight, tv_weight=params.tv_weight,
                jitter=params.jitter, blur_every=params.blur_every, blur_sigma=params.blur_sigma, seed=params.seed,
                height=params.size[0], width=params.size[1],
            ),
        )

        def step(index: int, submitted: float) -> float:
            started = time.perf_counter()
            if index == 0:
                loop.call_soon_threadsafe(job.mark_running)  # runs before this call's result is delivered
            value = maximizer.step()
            if self._observe_step is not None:
                self._observe_step(served.id, started - submitted, time.perf_counter() - started)
            return value

        interval, synced = self.store.sync_interval_s, -math.inf
        try:
            for index in range(params.steps):
                value = await loop.run_in_executor(executor, step, index, time.perf_counter())
                if not math.isfinite(value):
                    raise FloatingPointError(f"the objective became {value} at step {index + 1}; try a smaller lr")
                job.record(value)
                if time.monotonic() - synced >= interval:
                    synced = time.monotonic()
                    if not await self._sync(job):
                        return
            image, final = await loop.run_in_executor(executor, maximizer.finish)
            if not math.isfinite(final):
                raise FloatingPointError(f"the final objective is {final}")
            png = await loop.run_in_executor(self._encode_pool, encode_png, image)
            job.finish("succeeded", result=VisualizationResult(
                image_png=png, width=image.shape[1], height=image.shape[0], objective_curve=list(job.curve),
                initial_objective=job.curve[0], final_objective=final,
            ))
            log.info("visualization job %s on %r succeeded (%d steps)", job.id, served.id, params.steps)
        except asyncio.CancelledError:
            job.finish("cancelled")
        except Exception as exc:
            log.exception("visualization job %s on %r failed", job.id, served.id)
            job.finish("failed", error=ErrorDetail(code="visualization_failed",
                                                   message=f"{type(exc).__name__}: {exc}"))
        finally:
            await self._finished(job)
