"""Prometheus metrics of one server instance (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.runtime.batching import BatchStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Request, batch and queue metrics exposed at `/metrics`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "saliency_requests", "HTTP requests by model, endpoint and status.",
            ["model", "endpoint", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "saliency_request_seconds", "End-to-end request latency of successful requests.",
            ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "saliency_batch_size", "Items per executed batch.", ["model"], buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "saliency_batch_seconds", "Compute time per executed batch.", ["model"], buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.failed_items = Counter(
            "saliency_failed_items", "Batch items whose computation failed.", ["model"], registry=self.registry
        )
        self.queue_depth = Gauge(
            "saliency_queue_depth", "Requests waiting in the model's queue.", ["model"], registry=self.registry
        )
        self.model_ready = Gauge(
            "saliency_model_ready", "1 when the model is loaded and warm.", ["model"], registry=self.registry
        )
        self.random_weights = Gauge(
            "saliency_model_random_weights", "1 when the model runs on random weights.", ["model"],
            registry=self.registry,
        )

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.labels(stats.queue_name).observe(stats.batch_size)
        self.batch_seconds.labels(stats.queue_name).observe(stats.compute_s)
        if stats.failed_items:
            self.failed_items.labels(stats.queue_name).inc(stats.failed_items)

    def track_queue_depth(self, model_id: str, depth: Callable[[], int]) -> None:
        self.queue_depth.labels(model_id).set_function(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
