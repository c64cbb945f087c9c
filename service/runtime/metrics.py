"""Prometheus metrics of one server instance (its own registry, so several apps can live in one process).

Names follow Prometheus conventions (base units: seconds, bytes, ratios in [0, 1]; counters end in `_total`). The
README's "Monitoring" section lists every family, what it is for, and PromQL to alert on a shift. Three groups:
- traffic: requests and their latency by outcome, in-flight requests, queue depth and wait, device compute and batch
  size by work kind (predict, explain, job_step), explain compute per method, jobs by state;
- drift (per model): the top-1 probability, the prediction's normalised entropy, the predicted classes (bounded
  cardinality), and per method the maps' normalised entropy, top-10% mass and mass outside the crop's centre;
- the process: process/platform/GC collectors, GPU memory per CUDA device, and `saliency_build_info`.
"""

from __future__ import annotations

import math
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from service.runtime.batching import BatchStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Ratios in [0, 1] (probabilities, normalised entropies, mass shares): 0.05 apart, finer above 0.9 where a
# confident classifier's top-1 probability lives.
RATIO_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 19)) + (0.925, 0.95, 0.975, 0.99, 1.0)
WORK_KINDS = ("predict", "explain", "job_step")
OTHER_CLASS = "__other__"  # the predicted-class counter's bucket for classes without their own series
NO_MODEL = "none"  # the `model` label of requests that name no model (health, methods, jobs)
ANONYMOUS_CALLER = "anonymous"  # the `caller` label of requests without an API key (or a server without keys)

__all__ = ["Metrics", "PredictedClasses", "RequestObservation", "build_info", "prediction_entropy"]


@dataclass
class RequestObservation:
    """What one HTTP request did, for its latency series and its access-log line; filled in as the request goes
    (the routes add the model's work, the middleware the outcome)."""

    endpoint: str
    model: str = NO_MODEL
    status: int = 500
    code: str = ""  # the error envelope's code; empty for successes
    seconds: float = 0.0
    methods: tuple[str, ...] = ()
    queue_seconds: float | None = None
    compute_seconds: float | None = None
    batch_size: int | None = None
    caller: str = ""  # the fingerprint of the API key the request was authenticated with; empty: none


def prediction_entropy(probabilities: Sequence[float]) -> float:
    """Shannon entropy of a class distribution divided by log(classes): 0 for a one-hot prediction, 1 for uniform."""
    count = len(probabilities)
    if count < 2:
        return 0.0
    entropy = -sum(p * math.log(p) for p in probabilities if p > 0.0)
    return min(1.0, max(0.0, entropy / math.log(count)))


class PredictedClasses:
    """Per-model counts of predicted top-1 classes, exported as `saliency_predicted_class_total` with bounded
    cardinality.

    `limit=None`: one series per class the model knows (its labels: bounded by the configuration). `limit=N`: at
    most N classes get their own series, the rest are counted under `__other__`; a class gets a series when a slot is
    free at a scrape, the most frequent classes so far first, and keeps it (a counter never moves between series, so
    `rate()` stays correct). `limit=0` turns the counter off.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._counts: dict[str, dict[str, int]] = {}
        self._exported: dict[str, dict[str, None]] = {}  # insertion-ordered set per model
        self._other: dict[str, int] = {}
        self._lock = threading.Lock()

    def observe(self, model: str, label: str) -> None:
        if self.limit == 0:
            return
        with self._lock:
            counts = self._counts.setdefault(model, {})
            counts[label] = counts.get(label, 0) + 1
            if self.limit is not None and label not in self._exported.setdefault(model, {}):
                self._other[model] = self._other.get(model, 0) + 1

    def collect(self) -> Iterator[Metric]:
        if self.limit == 0:
            return
        family = CounterMetricFamily("saliency_predicted_class", "Predictions by top-1 class (bounded: see "
                                     "predicted_class_limit).", labels=["model", "class"])
        with self._lock:
            for model, counts in self._counts.items():
                if self.limit is None:
                    for label, count in counts.items():
                        family.add_metric([model, label], count)
                    continue
                exported = self._exported.setdefault(model, {})
                free = self.limit - len(exported)
                if free > 0:
                    # Counts seen before a class got its series stay under __other__ (its counter starts at 0).
                    for label in sorted((c for c in counts if c not in exported), key=lambda c: -counts[c])[:free]:
                        exported[label] = None
                        self._counts[model][label] = 0
                for label in exported:
                    family.add_metric([model, label], counts.get(label, 0))
                family.add_metric([model, OTHER_CLASS], self._other.get(model, 0))
        yield family


class _CallbackCollector:
    """A collector whose families are computed at scrape time."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


def _git_sha() -> str:
    """The checkout's commit when the server runs from a git clone, else "" (an installed wheel)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return ""
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def build_info(version: str, devices: Iterable[str]) -> dict[str, str]:
    """The labels of `saliency_build_info`: the server's `version`, its git commit when known, torch, timm, and the
    devices the models run on."""
    import timm
    import torch

    return {"version": version, "git_sha": _git_sha(), "torch": torch.__version__, "timm": timm.__version__,
            "device": ",".join(sorted(set(devices))) or "cpu"}


def gpu_memory() -> Iterator[Metric]:
    """Per CUDA device: torch's allocator counters (memory in tensors, memory the caching allocator holds) and, when
    nvidia-ml-py is installed, the device's used and total memory as the driver sees it (other processes included)."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    allocated = GaugeMetricFamily("saliency_gpu_memory_allocated_bytes", "Memory in tensors (torch).",
                                  labels=["device"])
    reserved = GaugeMetricFamily("saliency_gpu_memory_reserved_bytes", "Memory held by torch's caching allocator.",
                                 labels=["device"])
    count = torch.cuda.device_count()
    for index in range(count):
        allocated.add_metric([f"cuda:{index}"], torch.cuda.memory_allocated(index))
        reserved.add_metric([f"cuda:{index}"], torch.cuda.memory_reserved(index))
    yield allocated
    yield reserved
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return
    try:
        pynvml.nvmlInit()
        used = GaugeMetricFamily("saliency_gpu_memory_used_bytes", "Device memory in use, all processes (NVML).",
                                 labels=["device"])
        total = GaugeMetricFamily("saliency_gpu_memory_total_bytes", "Device memory (NVML).", labels=["device"])
        for index in range(count):
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
            used.add_metric([f"cuda:{index}"], info.used)
            total.add_metric([f"cuda:{index}"], info.total)
    except Exception:  # noqa: BLE001 - NVML missing or failing: torch's counters are still there
        return
    yield used
    yield total


class Metrics:
    """Everything exposed at `/metrics`."""

    def __init__(self, predicted_class_limit: int | None = None, process_collectors: bool = True) -> None:
        self.registry = registry = CollectorRegistry()
        # Traffic.
        self.requests = Counter(
            "saliency_requests", "HTTP requests by model, endpoint, status and error code.",
            ["model", "endpoint", "status", "code"], registry=registry,
        )
        self.latency = Histogram(
            "saliency_request_duration_seconds", "End-to-end request latency, every outcome (status, code).",
            ["model", "endpoint", "status", "code"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.caller_requests = Counter(
            "saliency_caller_requests", "HTTP requests by caller (the API key's fingerprint: the first 8 hex digits "
            "of its SHA-256; `anonymous` without a key), endpoint and status.",
            ["caller", "endpoint", "status"], registry=registry,
        )
        self.in_flight = Gauge(
            "saliency_requests_in_flight", "Requests being handled now, by the model they name (`none`: no model).",
            ["model"], registry=registry,
        )
        self.queue_wait = Histogram(
            "saliency_queue_wait_seconds", "Time an item waited before its batch (or job step) started.",
            ["model", "kind"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.compute = Histogram(
            "saliency_compute_seconds", "Device time of each batch's work of one kind (or of one job step).",
            ["model", "kind"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.batch_size = Histogram(
            "saliency_batch_size", "Items of one kind per executed batch.", ["model", "kind"], buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.method_compute = Histogram(
            "saliency_explain_method_seconds", "A method's compute time in the batch each explain request ran in.",
            ["model", "method"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.failed_items = Counter(
            "saliency_failed_items", "Batch items whose computation failed.", ["model"], registry=registry
        )
        self.queue_depth = Gauge(
            "saliency_queue_depth", "Requests waiting in the model's queue.", ["model"], registry=registry
        )
        self.queue_capacity = Gauge(
            "saliency_queue_capacity", "Most requests the model's queue holds (queue_size): beyond, 503 queue_full.",
            ["model"], registry=registry,
        )
        self.model_ready = Gauge(
            "saliency_model_ready", "1 when the model is loaded and warm.", ["model"], registry=registry
        )
        self.random_weights = Gauge(
            "saliency_model_random_weights", "1 when the model runs on random weights.", ["model"], registry=registry,
        )
        self.build = Gauge(
            "saliency_build_info", "Always 1; the labels say what is running.",
            ["version", "git_sha", "torch", "timm", "device"], registry=registry,
        )
        # Drift.
        self.confidence = Histogram(
            "saliency_prediction_confidence_ratio", "Top-1 probability of each prediction.", ["model"],
            buckets=RATIO_BUCKETS, registry=registry,
        )
        self.prediction_entropy = Histogram(
            "saliency_prediction_entropy_ratio", "Entropy of each prediction's class distribution / log(classes).",
            ["model"], buckets=RATIO_BUCKETS, registry=registry,
        )
        self.predicted_classes = PredictedClasses(predicted_class_limit)
        registry.register(self.predicted_classes)
        self.map_entropy = Histogram(
            "saliency_map_entropy_ratio", "Entropy of each map as a distribution / log(cells).", ["model", "method"],
            buckets=RATIO_BUCKETS, registry=registry,
        )
        self.map_top10_mass = Histogram(
            "saliency_map_top10_mass_ratio", "Share of each map's mass in its top 10% of cells.", ["model", "method"],
            buckets=RATIO_BUCKETS, registry=registry,
        )
        self.map_border_mass = Histogram(
            "saliency_map_border_mass_ratio", "Share of each map's mass outside the centre of the crop (the middle "
            "half of each side).", ["model", "method"], buckets=RATIO_BUCKETS, registry=registry,
        )
        # The process and the devices.
        if process_collectors:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        registry.register(_CallbackCollector(gpu_memory))
        self._job_states: Callable[[], Mapping[str, int]] | None = None
        registry.register(_CallbackCollector(self._jobs))

    # Traffic ------------------------------------------------------------------------------------------------------

    def observe_request(self, request: RequestObservation) -> None:
        labels = (request.model, request.endpoint, str(request.status), request.code)
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(request.seconds)
        self.caller_requests.labels(request.caller or ANONYMOUS_CALLER, request.endpoint, str(request.status)).inc()

    def observe_batch(self, stats: BatchStats) -> None:
        """Per batch: each item's queue wait, and each kind's item count and compute time."""
        for item in stats.items:
            self.queue_wait.labels(stats.queue_name, item.kind).observe(item.queue_wait_s)
        for kind, (count, seconds) in stats.kinds.items():
            self.batch_size.labels(stats.queue_name, kind).observe(count)
            self.compute.labels(stats.queue_name, kind).observe(seconds)
        if stats.failed_items:
            self.failed_items.labels(stats.queue_name).inc(stats.failed_items)

    def observe_job_step(self, model: str, queue_wait_s: float, compute_s: float) -> None:
        self.queue_wait.labels(model, "job_step").observe(queue_wait_s)
        self.compute.labels(model, "job_step").observe(compute_s)

    def observe_method_compute(self, model: str, method_seconds: Mapping[str, float]) -> None:
        for method, seconds in method_seconds.items():
            self.method_compute.labels(model, method).observe(seconds)

    def register_model(self, model_id: str, queue_size: int) -> None:
        """Create the model's series at start-up, so that the first failure or prediction is an increase from 0 (a
        series first seen at N is invisible to `increase()`)."""
        self.queue_capacity.labels(model_id).set(queue_size)
        self.failed_items.labels(model_id)
        self.confidence.labels(model_id)
        self.prediction_entropy.labels(model_id)

    def track_queue_depth(self, model_id: str, depth: Callable[[], int]) -> None:
        self.queue_depth.labels(model_id).set_function(depth)

    def track_jobs(self, states: Callable[[], Mapping[str, int]]) -> None:
        """`states()` gives the visualization jobs held per state, read at each scrape."""
        self._job_states = states

    def _jobs(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("saliency_jobs", "Visualization jobs held, by state.", labels=["state"])
        counts = dict(self._job_states()) if self._job_states is not None else {}
        for state in ("queued", "running", "succeeded", "failed", "cancelled"):
            family.add_metric([state], counts.get(state, 0))
        yield family

    def set_build_info(self, labels: Mapping[str, str]) -> None:
        self.build.labels(**labels).set(1)

    # Drift --------------------------------------------------------------------------------------------------------

    def observe_prediction(self, model: str, probabilities: Sequence[float], label: str) -> None:
        """One prediction: its top-1 probability, its normalised entropy, and its top-1 class `label`."""
        self.confidence.labels(model).observe(max(probabilities) if len(probabilities) else 0.0)
        self.prediction_entropy.labels(model).observe(prediction_entropy(probabilities))
        self.predicted_classes.observe(model, label)

    def observe_map(self, model: str, method: str, entropy: float, top10_mass: float, border_mass: float) -> None:
        self.map_entropy.labels(model, method).observe(entropy)
        self.map_top10_mass.labels(model, method).observe(top10_mass)
        self.map_border_mass.labels(model, method).observe(border_mass)

    def render(self) -> bytes:
        return generate_latest(self.registry)

