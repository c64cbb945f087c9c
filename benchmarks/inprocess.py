"""In-process measurements (no HTTP, no queue): the model's own throughput, and each explanation method's cost
as a multiple of one forward pass at the same batch size."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch

from benchmarks.cpu import cpu_usage, snapshot
from benchmarks.images import BenchImage
from benchmarks.timing import interleaved, median, spread
from service.config import ModelConfig, ServerSettings
from service.runtime.devices import DeviceLanes
from service.explain.requests import MethodRequestError, resolve_methods
from service.explain.pipeline import ExplainJob, run_explain_batch
from service.explain.registry import ExplainMethod, all_methods
from service.explain.targets import TargetRequest
from service.http.uploads import decode_image
from service.model.served import ServedModel, load_served_model

log = logging.getLogger(__name__)

# Methods whose registry cost is above this are run once, at batch 1 only.
EXPENSIVE_RELATIVE_COST = 50.0


def load_model(config: ModelConfig, settings: ServerSettings) -> ServedModel:
    """The model exactly as the server builds it (same config; random weights are drawn independently)."""
    quiet = logging.getLogger("service.model.served")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the random-weights warning is stated once in the report
    try:
        served = load_served_model(config, settings)
    finally:
        quiet.setLevel(level)
    served.ready = True
    return served


def photo_pixels(served: ServedModel, image: BenchImage, batch: int) -> torch.Tensor:
    """The photo decoded and preprocessed by the model's transform, repeated `batch` times: (B, C, H, W)."""
    pixels = served.preprocess(decode_image(image.data, 10**9))
    return pixels.unsqueeze(0).repeat(batch, 1, 1, 1).contiguous()


def varied_pixels(served: ServedModel, image: BenchImage, batch: int) -> torch.Tensor:
    """`batch` distinct inputs from the photo (flips and crops), for comparisons where identical rows would hide
    a mix-up between images."""
    from PIL import ImageOps

    photo = decode_image(image.data, 10**9)
    width, height = photo.size
    variants = []
    for i in range(batch):
        picture = ImageOps.mirror(photo) if i % 2 else photo
        shrink = (i // 2) % 4
        if shrink:
            dx, dy = width * shrink // 16, height * shrink // 16
            picture = picture.crop((dx, dy, width - dx, height - dy))
        variants.append(served.preprocess(picture))
    return torch.stack(variants)


def baseline_throughput(served: ServedModel, image: BenchImage, batch: int, budget_s: float) -> dict[str, Any]:
    """Images per second of the model's own forward pass (the /predict computation) at batch `batch`, and the
    CPU time it takes per image."""
    pixels = photo_pixels(served, image, batch)
    served.predict_probabilities(pixels)  # warm-up, outside the CPU accounting
    start = snapshot({"bench": None})
    (durations,) = interleaved([lambda: served.predict_probabilities(pixels)], served.device, budget_s,
                               min_repeats=3, max_repeats=10_000, warmup=0)
    usage = cpu_usage(start, snapshot({"bench": None}))
    images = batch * len(durations)
    bench_cores = usage.get("bench_cores")
    return {
        "batch_size": batch,
        "repeats": len(durations),
        "batch_ms": median(durations) * 1000.0,
        "images_per_s": batch / median(durations),
        "cpu_ms_per_image": None if bench_cores is None else bench_cores * usage["wall_s"] * 1000.0 / images,
        "spread": spread(durations),
        "cpu": usage,
    }


def lanes_throughput(served: ServedModel, image: BenchImage, lanes: int, batch: int, budget_s: float) -> dict[str, Any]:
    """Images per second with the server's CPU lanes: `lanes` threads each running forward passes at batch `batch`
    on its own copy of the model, torch's threads split between them as the server does (no HTTP, no queue)."""
    pixels = photo_pixels(served, image, batch)
    pool = DeviceLanes(served.device, lanes)
    served.make_copies(lanes)
    window: dict[str, Any] = {}

    def open_window() -> None:  # once every lane is warm
        window["start"], window["started"] = snapshot({"bench": None}), time.perf_counter()
        window["deadline"] = window["started"] + budget_s

    all_warm = threading.Barrier(lanes, action=open_window)

    def run() -> int:
        served.predict_probabilities(pixels)  # this lane's warm-up
        all_warm.wait()
        passes = 0
        while time.perf_counter() < window["deadline"]:
            served.predict_probabilities(pixels)
            passes += 1
        return passes

    try:
        passes = sum(f.result() for f in [pool.executor(i).submit(run) for i in range(lanes)])
        wall = time.perf_counter() - window["started"]
        usage = cpu_usage(window["start"], snapshot({"bench": None}))
    finally:
        pool.shutdown()
        served.make_copies(1)
    return {"lanes": lanes, "batch_size": batch, "images_per_s": passes * batch / wall, "cpu": usage}


def input_pipeline(served: ServedModel, image: BenchImage, budget_s: float) -> dict[str, Any]:
    """What the server does per request besides the model, timed here on one thread: decoding the upload, and the
    model's transform (resize, crop, to tensor, normalise)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the server's decode pool
    try:
        picture = decode_image(image.data, 10**9)
        decode, preprocess = interleaved(
            [lambda: decode_image(image.data, 10**9), lambda: served.preprocess(picture)],
            torch.device("cpu"), budget_s, min_repeats=5, max_repeats=10_000,
        )
    finally:
        torch.set_num_threads(previous)
    return {"decode_ms": median(decode) * 1000.0, "preprocess_ms": median(preprocess) * 1000.0}


def method_requests(method: ExplainMethod, served: ServedModel) -> tuple[Any, str | None]:
    """The method with its default params for this model, or (None, why it cannot run here)."""
    if served.family not in method.families:
        return None, f"not for {served.family} models (applies to {', '.join(method.families)})"
    try:
        return resolve_methods([method.name], served.family, served.anatomy), None
    except MethodRequestError as exc:
        return None, str(exc)


def explain_costs(
    served: ServedModel, image: BenchImage, batch_sizes: list[int], budget_s: float,
    methods: dict[str, ExplainMethod] | None = None,
) -> list[dict[str, Any]]:
    """Every registered method's time per image at each batch size, against a forward pass at the same batch."""
    methods = all_methods() if methods is None else methods
    largest = max(batch_sizes)
    pixels = photo_pixels(served, image, largest)
    rows = []
    for name, method in methods.items():
        requests, reason = method_requests(method, served)
        row: dict[str, Any] = {
            "method": name, "class_specific": method.class_specific, "registry_relative_cost": method.relative_cost,
            "status": "ok", "note": None, "batches": [],
        }
        if requests is None:
            row.update(status="not_applicable", note=reason)
            rows.append(row)
            continue
        expensive = method.relative_cost > EXPENSIVE_RELATIVE_COST
        sizes = [1] if expensive else batch_sizes
        if expensive:
            row["note"] = (f"registry relative_cost {method.relative_cost:g} > {EXPENSIVE_RELATIVE_COST:g}: "
                           "run once at batch 1 only")
        for batch in sizes:
            x = pixels[:batch]
            jobs = [ExplainJob(x[i], requests, TargetRequest(top_k=1)) for i in range(batch)]
            try:
                forward, explain = interleaved(
                    [lambda: served.predict_probabilities(x),
                     lambda: run_explain_batch(served, jobs)],
                    served.device, 0.0 if expensive else budget_s / len(sizes),
                    min_repeats=1 if expensive else 3, warmup=0 if expensive else 1,
                )
            except Exception as exc:  # noqa: BLE001 - one broken method must not end the benchmark
                log.exception("benchmarking method %r failed", name)
                row.update(status="error", note=f"{type(exc).__name__}: {exc}")
                break
            # Best of n: on a shared machine, interference only ever adds time.
            row["batches"].append({
                "batch_size": batch,
                "repeats": len(explain),
                "forward_ms": min(forward) * 1000.0,
                "explain_ms": min(explain) * 1000.0,
                "explain_ms_per_image": min(explain) * 1000.0 / batch,
                "cost_x_forward": min(explain) / min(forward),
                "cost_x_forward_median": median(explain) / median(forward),
                "spread": max(spread(forward), spread(explain)),
            })
        rows.append(row)
    return rows

