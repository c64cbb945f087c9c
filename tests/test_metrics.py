"""What `/metrics` says about the traffic, the work and the model's drift, read back from the exposition text."""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from service.explain.render.geometry import CropGeometry
from service.explain.render.maps import map_statistics
from service.runtime.batching import BatchQueue, BatchStats
from service.runtime.metrics import OTHER_CLASS, Metrics, PredictedClasses, prediction_entropy
from service.runtime.processor import PredictJob, make_batch_processor
from tests.helpers import png_bytes, random_image, running_app, settings_for, tiny_cnn_config, tiny_vit_config

Labels = frozenset[tuple[str, str]]


def samples(text: str) -> dict[tuple[str, Labels], float]:
    """Every sample of the exposition, keyed by (sample name, labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(exposition: dict[tuple[str, Labels], float], name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels` (0 when there are none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in exposition.items() if n == name and wanted <= set(ls))


def label_values(exposition: dict[tuple[str, Labels], float], name: str, label: str) -> set[str]:
    return {dict(ls)[label] for (n, ls), _ in exposition.items() if n == name and label in dict(ls)}


def upload(seed: int = 1) -> dict[str, Any]:
    return {"file": ("a.png", png_bytes(random_image(seed)), "image/png")}


# The exposition after a little traffic ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def traffic() -> dict[tuple[str, Labels], float]:
    """Three predictions, two explanations (gradcam with top_k 2 and saliency), and five kinds of failure, on two
    tiny models; then /metrics."""

    async def run() -> str:
        settings = settings_for(tiny_vit_config(), tiny_cnn_config(), max_body_bytes=200_000)
        async with running_app(settings) as (client, _):
            for seed in range(3):
                assert (await client.post("/v1/models/tiny_vit/predict", files=upload(seed))).status_code == 200
            for seed in range(2):
                response = await client.post(
                    "/v1/models/tiny_cnn/explain", files=upload(seed),
                    data={"methods": '["gradcam", "saliency"]', "target": '{"top_k": 2}'})
                assert response.status_code == 200, response.text
            assert (await client.post("/v1/models/nope/predict", files=upload())).status_code == 404
            assert (await client.post("/v1/models/tiny_vit/predict",
                                      files={"file": ("a.png", b"not an image", "image/png")})).status_code == 400
            assert (await client.post("/v1/models/tiny_cnn/explain", files=upload(),
                                      data={"methods": '["no_such_method"]'})).status_code == 422
            assert (await client.post("/v1/models/tiny_vit/predict", content=b"x" * 300_000,
                                      headers={"content-type": "image/png"})).status_code == 413
            assert (await client.get("/no/such/path")).status_code == 404
            return (await client.get("/metrics")).text

    return samples(asyncio.run(run()))


def test_every_request_is_timed_whatever_its_outcome(traffic) -> None:
    count = "saliency_request_duration_seconds_count"
    assert value(traffic, count, model="tiny_vit", endpoint="predict", status="200", code="") == 3
    assert value(traffic, count, model="tiny_cnn", endpoint="explain", status="200", code="") == 2
    assert value(traffic, count, model="unknown", endpoint="predict", status="404", code="model_not_found") == 1
    assert value(traffic, count, model="tiny_vit", endpoint="predict", status="400", code="not_an_image") == 1
    assert value(traffic, count, model="tiny_cnn", endpoint="explain", status="422", code="invalid_request") == 1
    # Refused by the body-size limit before the app's routes run: still counted, with its code.
    assert value(traffic, count, model="tiny_vit", status="413", code="body_too_large") == 1
    # Paths no route serves share one endpoint label, whatever the path (bounded cardinality).
    assert value(traffic, count, model="none", endpoint="unmatched", status="404", code="not_found") == 1
    assert value(traffic, "saliency_requests_total", endpoint="predict") == value(traffic, count, endpoint="predict")


def test_unknown_model_ids_do_not_create_label_values(traffic) -> None:
    assert "nope" not in label_values(traffic, "saliency_requests_total", "model")
    assert label_values(traffic, "saliency_requests_total", "model") <= {"tiny_vit", "tiny_cnn", "unknown", "none"}


def test_queue_wait_compute_and_batch_size_are_split_by_work_kind(traffic) -> None:
    assert value(traffic, "saliency_queue_wait_seconds_count", model="tiny_vit", kind="predict") == 3
    assert value(traffic, "saliency_queue_wait_seconds_count", model="tiny_cnn", kind="explain") == 2
    assert value(traffic, "saliency_batch_size_sum", model="tiny_vit", kind="predict") == 3  # items, over batches
    assert value(traffic, "saliency_compute_seconds_count", model="tiny_cnn", kind="explain") >= 1
    assert value(traffic, "saliency_compute_seconds_sum", model="tiny_cnn", kind="explain") > 0
    assert value(traffic, "saliency_queue_wait_seconds_count", kind="explain", model="tiny_vit") == 0


def test_explain_compute_is_recorded_per_method(traffic) -> None:
    for method in ("gradcam", "saliency"):
        assert value(traffic, "saliency_explain_method_seconds_count", model="tiny_cnn", method=method) == 2
        assert value(traffic, "saliency_explain_method_seconds_sum", model="tiny_cnn", method=method) > 0


def test_every_prediction_feeds_the_confidence_and_entropy_histograms(traffic) -> None:
    # Explanations predict too: their predictions count.
    for model, predictions in (("tiny_vit", 3), ("tiny_cnn", 2)):
        assert value(traffic, "saliency_prediction_confidence_ratio_count", model=model) == predictions
        assert value(traffic, "saliency_prediction_entropy_ratio_count", model=model) == predictions
        assert value(traffic, "saliency_predicted_class_total", model=model) == predictions
        # Random 10-class models: top-1 probabilities near 0.1, entropies near 1.
        assert 0.1 <= value(traffic, "saliency_prediction_confidence_ratio_sum", model=model) / predictions < 0.5
        assert 0.8 < value(traffic, "saliency_prediction_entropy_ratio_sum", model=model) / predictions <= 1.0
    assert label_values(traffic, "saliency_predicted_class_total", "class") <= {f"class_{i}" for i in range(10)}


def test_every_map_feeds_the_map_drift_histograms(traffic) -> None:
    # gradcam follows 2 classes per image (top_k 2): 4 maps; saliency is class-specific too.
    for method in ("gradcam", "saliency"):
        for family in ("saliency_map_entropy_ratio", "saliency_map_top10_mass_ratio",
                       "saliency_map_border_mass_ratio"):
            assert value(traffic, f"{family}_count", model="tiny_cnn", method=method) == 4, (family, method)
            mean = value(traffic, f"{family}_sum", model="tiny_cnn", method=method) / 4
            assert 0.0 <= mean <= 1.0


def test_nothing_is_left_in_flight_after_the_requests(traffic) -> None:
    # The /metrics request itself is the only one in flight while it renders.
    assert value(traffic, "saliency_requests_in_flight") == 1
    assert value(traffic, "saliency_requests_in_flight", model="none") == 1


def test_build_info_names_what_is_running(traffic) -> None:
    from service import __version__

    [labels] = [dict(ls) for (n, ls), v in traffic.items() if n == "saliency_build_info" and v == 1]
    assert labels["version"] == __version__
    assert labels["torch"] == torch.__version__ and labels["device"] == "cpu"
    assert labels["timm"] and "git_sha" in labels


def test_process_and_runtime_collectors_are_registered(traffic) -> None:
    assert value(traffic, "process_resident_memory_bytes") > 0
    assert value(traffic, "python_info") == 1
    assert any(n.startswith("python_gc_") for n, _ in traffic)


def test_gpu_memory_is_not_reported_without_cuda(traffic) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert not any(n.startswith("saliency_gpu_") for n, _ in traffic)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_memory_is_reported_per_cuda_device() -> None:
    metrics = Metrics(process_collectors=False)
    torch.ones(1024, device="cuda")
    exposition = samples(metrics.render().decode())
    assert value(exposition, "saliency_gpu_memory_allocated_bytes", device="cuda:0") > 0
    assert value(exposition, "saliency_gpu_memory_reserved_bytes", device="cuda:0") > 0


# Visualization jobs -----------------------------------------------------------------------------------------------

def test_job_steps_are_timed_and_jobs_counted_by_state() -> None:
    async def run() -> dict[tuple[str, Labels], float]:
        async with running_app(settings_for(tiny_vit_config())) as (client, _):
            body = {"objective": {"type": "class", "index": 3}, "steps": 5, "size": [32, 32]}
            started = await client.post("/v1/models/tiny_vit/visualizations", json=body)
            assert started.status_code == 202, started.text
            job_id = started.json()["id"]
            deadline = time.perf_counter() + 30
            while (await client.get(f"/v1/jobs/{job_id}")).json()["status"] in ("queued", "running"):
                assert time.perf_counter() < deadline
                await asyncio.sleep(0.02)
            return samples((await client.get("/metrics")).text)

    exposition = asyncio.run(run())
    assert value(exposition, "saliency_queue_wait_seconds_count", model="tiny_vit", kind="job_step") == 5
    assert value(exposition, "saliency_compute_seconds_count", model="tiny_vit", kind="job_step") == 5
    assert value(exposition, "saliency_jobs", state="succeeded") == 1
    assert value(exposition, "saliency_jobs", state="running") == 0


# The batch queue's per-kind report --------------------------------------------------------------------------------

def test_a_mixed_batch_reports_each_kinds_items_and_compute_time() -> None:
    class OtherJob:
        kind = "other"

    def slow(served, jobs, batch):
        time.sleep(0.05)
        return [0] * len(jobs)

    def fast(served, jobs, batch):
        return [1] * len(jobs)

    reports: list[BatchStats] = []

    async def run() -> None:
        process = make_batch_processor(None, {PredictJob: fast, OtherJob: slow})  # type: ignore[arg-type]
        with ThreadPoolExecutor(1) as pool:
            queue = BatchQueue("m", process, pool, max_batch_size=8, max_wait_ms=50, queue_size=8, timeout_s=10,
                               on_batch=reports.append)
            queue.start()
            await asyncio.gather(*(queue.submit(PredictJob(torch.zeros(1))) for _ in range(3)),
                                 *(queue.submit(OtherJob()) for _ in range(2)))
            await queue.close()

    asyncio.run(run())
    [report] = reports
    assert report.batch_size == 5
    assert sorted(item.kind for item in report.items) == ["other", "other", "predict", "predict", "predict"]
    assert all(item.queue_wait_s >= 0 for item in report.items)
    assert report.kinds["predict"][0] == 3 and report.kinds["other"][0] == 2
    assert report.kinds["other"][1] >= 0.05 > report.kinds["predict"][1]  # each kind's own time, not the batch's
    assert report.kinds["other"][1] <= report.compute_s


# Drift helpers ----------------------------------------------------------------------------------------------------

def test_prediction_entropy_is_zero_for_one_hot_and_one_for_uniform() -> None:
    assert prediction_entropy([1.0, 0.0, 0.0]) == 0.0
    assert prediction_entropy([0.25] * 4) == pytest.approx(1.0)
    assert prediction_entropy([0.5, 0.5, 0.0, 0.0]) == pytest.approx(math.log(2) / math.log(4))


def _classes(counter: PredictedClasses) -> dict[str, float]:
    return {s.labels["class"]: s.value for family in counter.collect() for s in family.samples
            if s.name.endswith("_total")}


def test_predicted_classes_get_one_series_each_by_default() -> None:
    counter = PredictedClasses(None)
    for label in ["cat"] * 3 + ["dog"]:
        counter.observe("m", label)
    assert _classes(counter) == {"cat": 3, "dog": 1}


def test_predicted_classes_beyond_the_limit_are_counted_under_other_and_never_move() -> None:
    counter = PredictedClasses(2)
    for label in ["cat"] * 5 + ["dog"] * 3 + ["fox"]:
        counter.observe("m", label)
    first = _classes(counter)  # the two most frequent get series; what was counted before that stays under other
    assert set(first) == {"cat", "dog", OTHER_CLASS} and sum(first.values()) == 9
    for label in ["fox"] * 10 + ["cat"]:
        counter.observe("m", label)
    second = _classes(counter)
    assert set(second) == {"cat", "dog", OTHER_CLASS}  # fox became frequent, but the slots are taken
    assert second[OTHER_CLASS] == first[OTHER_CLASS] + 10 and second["cat"] == first["cat"] + 1
    assert all(second[c] >= first[c] for c in first)  # counters only go up
    assert sum(second.values()) == 20


def test_predicted_classes_can_be_turned_off() -> None:
    counter = PredictedClasses(0)
    counter.observe("m", "cat")
    assert list(counter.collect()) == []


def test_predicted_class_limit_is_a_server_setting() -> None:
    async def run() -> dict[tuple[str, Labels], float]:
        async with running_app(settings_for(tiny_vit_config(), predicted_class_limit=0)) as (client, _):
            assert (await client.post("/v1/models/tiny_vit/predict", files=upload())).status_code == 200
            return samples((await client.get("/metrics")).text)

    exposition = asyncio.run(run())
    assert value(exposition, "saliency_prediction_confidence_ratio_count") == 1
    assert not any(n.startswith("saliency_predicted_class") for n, _ in exposition)


_GEOMETRY = CropGeometry(original_size=(8, 8), input_size=(8, 8), scale=(1.0, 1.0), offset=(0.0, 0.0))


@pytest.mark.parametrize(("cells", "expected"), [
    ([(3, 3), (4, 4), (3, 4), (4, 3)], 0.0),  # inside the middle half of each side
    ([(0, 0)], 1.0),  # a corner
    ([(0, 3), (3, 0)], 1.0),  # centred on one axis only: still outside the centre
])
def test_border_mass_is_the_share_outside_the_middle_half_of_each_side(cells, expected) -> None:
    grid = torch.zeros(8, 8)
    for row, col in cells:
        grid[row, col] = 1.0
    assert map_statistics(grid, _GEOMETRY).border_mass == pytest.approx(expected)


def test_a_uniform_map_has_three_quarters_of_its_mass_outside_the_centre() -> None:
    assert map_statistics(torch.ones(8, 8), _GEOMETRY).border_mass == pytest.approx(0.75)
