"""Runs the whole benchmark: server start-up, HTTP load points, in-process measurements, comparisons, report."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


from benchmarks import inprocess, references
from benchmarks.environment import environment
from benchmarks.images import BenchImage, load_bench_image, multipart_body
from benchmarks.peers.measure import measure_peers
from benchmarks.options import DEFAULT_MODEL, SMOKE_MODEL, SMOKE_REFERENCE_CNN, BenchOptions
from benchmarks.report import analyse_cpu, evaluate_targets, render_markdown
from benchmarks.server import ServerProcess, load_point, load_timeout, run_load, write_config
from service.config import ModelConfig, ServerSettings, read_config_file
from service.runtime.batching import lane_batch_cap
from service.runtime.devices import lane_count
from service.explain.registry import all_methods
from service.model.served import ServedModel

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
NOBATCH_SUFFIX = "-nobatch"


def _progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def server_configuration(options: BenchOptions) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Server-level keys and the models to benchmark (from --config, or random-weight models by name)."""
    if options.config is not None:
        data = read_config_file(options.config)
        models = list(data.pop("models", []))
        if options.models:
            by_id = {m.get("id"): m for m in models}
            missing = [m for m in options.models if m not in by_id]
            if missing:
                raise SystemExit(f"--models {missing}: not in {options.config} (it has {sorted(by_id)})")
            models = [by_id[m] for m in options.models]
    else:
        data = {}
        if options.smoke and not options.models:
            models = [dict(SMOKE_MODEL)]
        else:
            models = [{"id": name, "architecture": name, "weights": "random"}
                      for name in (options.models or [DEFAULT_MODEL])]
    if not models:
        raise SystemExit("no models to benchmark")
    for key in ("host", "port", "models"):
        data.pop(key, None)
    if options.device is not None:
        data["device"] = options.device
    if options.dtype is not None:
        data["dtype"] = options.dtype
    ServerSettings.model_validate({**data, "models": models})  # fail early, naming the bad key
    return data, models


def without_batching(model: dict[str, Any]) -> dict[str, Any]:
    """The same model with batching off, served beside it for the on/off comparison."""
    return {**model, "id": f"{model['id']}{NOBATCH_SUFFIX}", "max_batch_size": 1, "warmup_batch_sizes": [1]}


def measure_http(
    server: ServerProcess, model: dict[str, Any], served: ServedModel, image: BenchImage, workdir: Path,
    options: BenchOptions, result: dict[str, Any],
) -> None:
    model_id = model["id"]
    predict_body, predict_type = multipart_body(image, {"top_k": "5"})
    predict_file = workdir / "predict_body.bin"
    predict_file.write_bytes(predict_body)

    if "baseline" not in options.skip:
        _progress(f"{model_id}: in-process baseline at batch {served.config.max_batch_size}")
        result["baseline"]["before"] = inprocess.baseline_throughput(
            served, image, served.config.max_batch_size, options.baseline_s)
        result["baseline"]["input_pipeline"] = inprocess.input_pipeline(served, image, min(1.0, options.baseline_s))

    if "predict" not in options.skip:
        points = []
        for concurrency in options.concurrency:  # on and off interleaved, so drifts of the machine hit both
            for mode, served_id in (("batching_on", model_id), ("batching_off", model_id + NOBATCH_SUFFIX)):
                point = load_point(mode, f"/v1/models/{served_id}/predict", concurrency, predict_file, predict_type,
                               options)
                points.append(point)
        _progress(f"{model_id}: /predict at {options.concurrency} clients, batching on and off "
                  f"({len(points)} points of {options.warmup_s:g}+{options.duration_s:g}s)")
        for outcome in run_load(server, points, workdir, load_timeout(points)):
            outcome["mode"] = outcome.pop("name")
            result["predict"].append(outcome)
        result["analysis"] = analyse_cpu(result)

    if not {"peers", "explain_peers"} <= options.skip:
        measure_peers(server, model, served, image, workdir, options, result, _progress)

    if "baseline" not in options.skip:
        result["baseline"]["after"] = inprocess.baseline_throughput(
            served, image, served.config.max_batch_size, options.baseline_s)
        rates = [result["baseline"][k]["images_per_s"] for k in ("before", "after")]
        result["baseline"]["images_per_s"] = sum(rates) / len(rates)
        if result["lanes"] > 1:
            batch = lane_batch_cap(served.config.max_batch_size, result["lanes"])
            _progress(f"{model_id}: in process with the server's {result['lanes']} lanes at batch {batch} each")
            result["baseline"]["lanes"] = inprocess.lanes_throughput(served, image, result["lanes"], batch,
                                                                     options.baseline_s)

    if "explain_http" not in options.skip:
        method = options.explain_http_method or ("raw_attention" if served.family == "vit" else "gradcam")
        body, content_type = multipart_body(image, {"methods": json.dumps([method]), "top_k": "5"})
        explain_file = workdir / "explain_body.bin"
        explain_file.write_bytes(body)
        points = [load_point(f"explain {method}", f"/v1/models/{model_id}/explain", c, explain_file, content_type, options)
                  for c in options.explain_http_concurrency]
        _progress(f"{model_id}: /explain ({method}, default output) at {options.explain_http_concurrency} clients")
        for outcome in run_load(server, points, workdir, load_timeout(points)):
            outcome["method"] = method
            outcome["output"] = "heatmap_png in the original image's space (the default)"
            result["explain_http"].append(outcome)


def measure_inprocess(served: ServedModel, image: BenchImage, options: BenchOptions, result: dict[str, Any],
                      reference_cnn: ServedModel | None) -> None:
    batch = served.config.max_batch_size
    if "explain_cost" not in options.skip:
        sizes = sorted({1, batch})
        methods = all_methods()
        if options.methods is not None:
            methods = {name: method for name, method in methods.items() if name in options.methods}
        which = "every registered method" if options.methods is None else "the methods " + ", ".join(methods)
        _progress(f"{served.id}: explanation cost of {which} at batch {sizes}")
        result["explain_cost"] = inprocess.explain_costs(served, image, sizes, options.method_s, methods)
    if "references" not in options.skip:
        _progress(f"{served.id}: comparisons with the reference implementations")
        budget = options.reference_s
        pixels = inprocess.varied_pixels(served, image, options.reference_batch)
        cnn_pixels = (None if reference_cnn is None
                      else inprocess.varied_pixels(reference_cnn, image, options.reference_batch))
        comparisons = []
        if options.compares("gradcam"):
            comparisons.append(references.gradcam_comparison(served, pixels, budget))
            if reference_cnn is not None:
                comparisons.append(references.gradcam_comparison(reference_cnn, cnn_pixels, budget))
        if options.compares("rollout"):
            comparisons.append(references.rollout_comparison(served, pixels, budget))
        for method in ("saliency", "integrated_gradients"):
            if options.compares(method):
                comparisons.append(references.captum_comparison(served, pixels, budget, method))
        if options.compares("lrp"):  # a CNN method: on the served model if it is one, and on the reference CNN
            if served.family == "cnn":
                comparisons.append(references.lrp_comparison(served, pixels, budget))
            if reference_cnn is not None:
                comparisons.append(references.lrp_comparison(reference_cnn, cnn_pixels, budget))
        if served.family == "vit":
            if options.compares("attn_lrp"):
                comparisons.append(references.attn_lrp_comparison(served, pixels, budget))
            if options.compares("transformer_attribution"):
                comparisons.append(references.transformer_attribution_comparison(served, pixels, budget))
        result["references"] = comparisons


def _model_result(model: dict[str, Any], served: ServedModel, server_keys: dict[str, Any]) -> dict[str, Any]:
    lanes = lane_count(served.device, server_keys.get("cpu_workers"))
    return {
        "id": model["id"],
        "architecture": served.architecture,
        "family": served.family,
        "weights": {"source": served.weights.source, "random": served.weights.random, "note": served.weights.note},
        "device": str(served.device),
        "dtype": str(served.dtype).removeprefix("torch."),
        "input_size": list(served.input_size),
        "max_batch_size": served.config.max_batch_size,
        "max_wait_ms": served.config.max_wait_ms,
        "lanes": lanes,
        "baseline": {},
        "predict": [],
        "explain_http": [],
        "peers": {},
        "explain_cost": [],
        "references": [],
        "targets": [],
        "analysis": {},
    }


def run_benchmark(options: BenchOptions) -> dict[str, Any]:
    started = time.perf_counter()
    unknown = sorted(set(options.methods or ()) - set(all_methods()))
    if unknown:
        raise SystemExit(f"--methods: no registered methods {unknown}; registered: {', '.join(all_methods())}")
    server_keys, models = server_configuration(options)
    image = load_bench_image(options.image, REPO_ROOT)
    settings = ServerSettings.model_validate({**server_keys, "models": models})
    served_models = []
    for model in models:
        _progress(f"loading {model['id']} in this process")
        served_models.append(inprocess.load_model(ModelConfig.model_validate(model), settings))
    device = served_models[0].device
    report: dict[str, Any] = {
        "schema_version": 1,
        "command": options.command,
        "smoke": options.smoke,
        "environment": environment(device),
        "image": {"source": image.source, "width": image.size[0], "height": image.size[1],
                  "bytes": len(image.data), "content_type": image.content_type},
        "settings": {
            "duration_s": options.duration_s, "warmup_s": options.warmup_s, "requests": options.requests,
            "concurrency": options.concurrency, "baseline_s": options.baseline_s, "method_s": options.method_s,
            "reference_s": options.reference_s, "reference_batch": options.reference_batch,
            "explain_http_concurrency": options.explain_http_concurrency, "peer_rounds": options.peer_rounds,
            "skipped_sections": sorted(options.skip),
            "methods": None if options.methods is None else sorted(options.methods),
            "comparisons": None if options.comparisons is None else sorted(options.comparisons),
            "server_config": {**server_keys, "models": models + [without_batching(m) for m in models]},
        },
        "server": {},
        "models": [_model_result(m, s, server_keys) for m, s in zip(models, served_models)],
        "notes": [],
    }
    if any(s.weights.random for s in served_models):
        report["notes"].append("Random weights: predictions and maps are meaningless, timings are not affected.")

    with tempfile.TemporaryDirectory(prefix="saliency-bench-") as tmp:
        workdir = Path(tmp)
        if not {"predict", "peers", "explain_peers", "explain_http"} <= options.skip:
            config_path = write_config(workdir / "server.yaml", server_keys,
                                       models + [without_batching(m) for m in models])
            _progress(f"starting the server ({len(models) * 2} models: batching on and off)")
            with ServerProcess(config_path, workdir) as server:
                report["server"] = {"startup_s": server.startup_s, "base_url": server.base_url}
                for model, served, result in zip(models, served_models, report["models"]):
                    measure_http(server, model, served, image, workdir, options, result)
        elif "baseline" not in options.skip:
            for served, result in zip(served_models, report["models"]):
                result["baseline"]["before"] = inprocess.baseline_throughput(
                    served, image, served.config.max_batch_size, options.baseline_s)
                result["baseline"]["images_per_s"] = result["baseline"]["before"]["images_per_s"]

    reference_cnn = None
    if "references" not in options.skip and (options.compares("gradcam") or options.compares("lrp")):
        cnn = dict(SMOKE_REFERENCE_CNN) if options.smoke else {"architecture": options.reference_cnn}
        cnn_config = ModelConfig.model_validate({"id": "reference_cnn", "weights": "random", **cnn,
                                                 "device": str(device), "dtype": settings.dtype})
        reference_cnn = inprocess.load_model(cnn_config, settings)
    for served, result in zip(served_models, report["models"]):
        measure_inprocess(served, image, options, result, reference_cnn)
        result["targets"] = evaluate_targets(result)
    report["duration_s"] = time.perf_counter() - started
    _progress(f"done in {report['duration_s']:.0f}s")
    return report


def write_outputs(report: dict[str, Any], options: BenchOptions) -> str:
    markdown = render_markdown(report)
    text = json.dumps(report, indent=2, allow_nan=False)
    if options.output_json:
        Path(options.output_json).write_text(text + "\n", encoding="utf-8")
    if options.output_md:
        Path(options.output_md).write_text(markdown, encoding="utf-8")
    return markdown
