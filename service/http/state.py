"""Everything the running server holds: settings, models, their queues, workers and metrics."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import torch
from PIL import Image

from api_schemas import MethodResult
from service import __version__
from service.config import ServerSettings
from service.explain.pipeline import ExplainJob, run_explain_batch
from service.http.tracing import span
from service.http.uploads import decode_image, resized_size_check
from service.model.served import ServedModel
from service.runtime.batching import BatchQueue, lane_batch_cap
from service.runtime.devices import DeviceWorkers, use_one_thread
from service.runtime.metrics import Metrics, build_info
from service.runtime.processor import PredictJob, make_batch_processor, predict_batch
from service.visualization.jobs import JobManager
from service.visualization.store import create_job_store

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class ServiceState:
    """Shared by every request through FastAPI's dependency injection."""

    settings: ServerSettings
    models: dict[str, ServedModel]
    metrics: Metrics = field(init=False)
    workers: DeviceWorkers = field(init=False)
    queues: dict[str, BatchQueue] = field(default_factory=dict)
    decode_pool: ThreadPoolExecutor = field(init=False)
    jobs: JobManager = field(init=False)  # visualization jobs
    warmup_task: asyncio.Task[None] | None = None
    draining: bool = False  # SIGTERM received: not ready, new requests refused (service/http/serving.py)

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.settings.predicted_class_limit)
        self.metrics.set_build_info(build_info(__version__, (str(served.device) for served in self.models.values())))
        self.workers = DeviceWorkers(self.settings.cpu_workers)
        self.decode_pool = ThreadPoolExecutor(self.settings.decode_threads, thread_name_prefix="decode",
                                              initializer=use_one_thread)
        self.jobs = JobManager(self.workers, self.decode_pool, self.settings.max_jobs, self.settings.max_finished_jobs,
                               observe_step=self.metrics.observe_job_step,
                               store=create_job_store(self.settings.job_store, self.settings.max_finished_jobs,
                                                      self.settings.job_ttl_s))
        self.metrics.track_jobs(self.jobs.state_counts)

    @property
    def ready(self) -> bool:
        return not self.draining and all(m.ready for m in self.models.values())

    def start_draining(self) -> bool:
        """Fail readiness and refuse new requests from now on (called from the signal handler)."""
        self.draining = True
        return True

    def start_queues(self) -> None:
        """Create and start one batch queue per model."""
        for served in self.models.values():
            cfg = served.config
            lanes = self.workers.lanes(served.device)
            served.make_copies(lanes.count)
            queue: BatchQueue = BatchQueue(
                served.id,
                make_batch_processor(served, {PredictJob: predict_batch, ExplainJob: run_explain_batch}),
                lanes,
                max_batch_size=cfg.max_batch_size,
                max_wait_ms=cfg.max_wait_ms,
                queue_size=cfg.queue_size,
                timeout_s=cfg.timeout_s,
                on_batch=self.metrics.observe_batch,
                dispatch_when_idle=cfg.dispatch_when_idle,
            )
            queue.start()
            self.queues[served.id] = queue
            self.metrics.track_queue_depth(served.id, lambda q=queue: q.depth)
            self.metrics.random_weights.labels(served.id).set(1 if served.weights.random else 0)
            self.metrics.model_ready.labels(served.id).set(0)
            self.metrics.register_model(served.id, cfg.queue_size)

    async def warm_up(self) -> None:
        """Warm every model on each lane of its device (each lane runs its own copy) at batch 1 and the batch cap."""
        loop = asyncio.get_running_loop()
        for served in self.models.values():
            lanes = self.workers.lanes(served.device)
            cfg = served.config
            sizes = cfg.warmup_batch_sizes or sorted({1, lane_batch_cap(cfg.max_batch_size, lanes.count)})
            try:
                await asyncio.gather(*(loop.run_in_executor(executor, served.warm_up, sizes)
                                       for executor in lanes.executors))
                served.ready = True
            except Exception as exc:  # noqa: BLE001
                log.exception("model %r failed its warm-up: it stays not ready", served.id)
                served.failure = f"warm-up failed: {type(exc).__name__}: {exc}"
                continue
            self.metrics.model_ready.labels(served.id).set(1)
        if self.ready:
            log.info("all %d models warm: ready", len(self.models))

    async def decode_and_preprocess(self, served: ServedModel, data: bytes) -> tuple[Image.Image, object]:
        """Decode the upload and apply the model's transform, off the event loop."""

        def work() -> tuple[Image.Image, object]:
            fits = resized_size_check(served.transform, self.settings.max_resized_pixels, served.id)
            image = decode_image(data, self.settings.max_image_pixels, fits)
            return image, served.preprocess(image)

        with span("decode", **{"saliency.model": served.id, "saliency.upload_bytes": len(data)}):
            return await self.off_loop(work)

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU work (decoding, preprocessing, rendering) on the decode pool, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, fn, *args)

    def observe_explanations(self, served: ServedModel, outcome: Any, explanations: Sequence[MethodResult]) -> None:
        """The drift signals of an explain request: its prediction, and each map's entropy, top-10% mass and mass
        outside the crop's centre; plus each method's compute time in its batch."""
        self.observe_prediction(served, outcome.probabilities)
        self.metrics.observe_method_compute(served.id, {r.method: r.compute_ms / 1000.0 for r in explanations})
        for result in explanations:
            for explained in result.results:
                stats = explained.map.statistics
                self.metrics.observe_map(served.id, result.method, stats.entropy, stats.top10_mass, stats.border_mass)

    def observe_prediction(self, served: ServedModel, probabilities: torch.Tensor) -> None:
        """The drift signals of one prediction (its top-1 probability, its entropy, its class)."""
        values = probabilities.detach().float().cpu().tolist()
        top = max(range(len(values)), key=values.__getitem__) if values else 0
        label = served.labels[top] if top < len(served.labels) else str(top)
        self.metrics.observe_prediction(served.id, values, label)

    async def shutdown(self) -> None:
        """Drain every queue (accepted requests get answers), then stop the workers."""
        if self.warmup_task is not None and not self.warmup_task.done():
            self.warmup_task.cancel()
        await self.jobs.shutdown()  # cancel visualization jobs before the workers stop
        await asyncio.gather(*(queue.close() for queue in self.queues.values()))
        self.workers.shutdown()
        self.decode_pool.shutdown(wait=True)
