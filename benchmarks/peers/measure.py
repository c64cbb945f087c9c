"""The peer comparison of `saliency-server bench`: the server against LitServe and a plain FastAPI handler on the
same model, the same JSON request and the same load generator, in rounds that alternate the systems (so drifts of
the machine hit all of them); then /explain against a per-request Captum handler and the reference libraries."""

from __future__ import annotations

import base64
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Callable

from benchmarks.images import BenchImage
from benchmarks.server import ServerProcess, load_point, load_timeout, run_load
from service.explain.registry import all_methods
from service.runtime.batching import lane_batch_cap
from service.runtime.devices import COMPUTE_THREADS
from service.model.served import ServedModel

PLAIN = "plain FastAPI (def route, one forward per request)"
LITSERVE = "LitServe (one worker per lane, same batch cap and wait)"
OURS = "saliency-server"
# The four-method request of the comparison with the reference libraries (those that apply to the model).
EXPLAIN_METHODS = ("saliency", "input_x_gradient", "gradcam", "gae")


def _model_arguments(model: dict[str, Any], served: ServedModel) -> list[str]:
    data_config = {k: v for k, v in served.data_config.items()}
    return ["--architecture", served.architecture, "--model-kwargs", json.dumps(model.get("model_kwargs") or {}),
            "--data-config", json.dumps(data_config), "--device", str(served.device),
            "--dtype", str(served.dtype).removeprefix("torch.")]


def litserve_settings(served: ServedModel, lanes: int) -> dict[str, Any]:
    """LitServe tuned like the server: a worker per lane, the per-lane batch cap, the batch wait, the threads split."""
    threads = max(1, COMPUTE_THREADS // lanes) if served.device.type == "cpu" else None
    return {"workers": lanes, "max_batch_size": lane_batch_cap(served.config.max_batch_size, lanes),
            "batch_timeout_ms": served.config.max_wait_ms, "threads": threads}


def litserve_command(model: dict[str, Any], served: ServedModel,
                     settings: dict[str, Any]) -> Callable[[int], list[str]]:
    def command(port: int) -> list[str]:
        words = [sys.executable, "-m", "benchmarks.peers.litserve_peer", *_model_arguments(model, served),
                 "--port", str(port), "--workers", str(settings["workers"]),
                 "--max-batch-size", str(settings["max_batch_size"]),
                 "--batch-timeout-ms", str(settings["batch_timeout_ms"])]
        if settings["threads"]:
            words += ["--threads", str(settings["threads"])]
        return words
    return command


def plain_command(model: dict[str, Any], served: ServedModel, ig: dict[str, Any]) -> Callable[[int], list[str]]:
    anatomy = served.anatomy

    def command(port: int) -> list[str]:
        words = [sys.executable, "-m", "benchmarks.peers.plain", *_model_arguments(model, served),
                 "--port", str(port), "--family", served.family, "--feature-layer", anatomy.feature_layer,
                 "--prefix", str(anatomy.num_prefix_tokens),
                 "--mean", *map(str, served.data_config["mean"]), "--std", *map(str, served.data_config["std"]),
                 "--ig-steps", str(ig["steps"]), "--ig-method", str(ig["integration"]),
                 "--chunk", str(served.config.explain_chunk_size)]
        if anatomy.grid_size is not None:
            words += ["--grid", *map(str, anatomy.grid_size)]
        return words
    return command


def _json_file(path: Path, body: dict[str, Any]) -> Path:
    path.write_bytes(json.dumps(body).encode())
    return path


def measure_peers(server: ServerProcess, model: dict[str, Any], served: ServedModel, image: BenchImage,
                  workdir: Path, options: Any, result: dict[str, Any], progress: Callable[[str], None]) -> None:
    """Fill result["peers"]: "predict" (rows of system, round, concurrency, outcome), "explain", "settings"."""
    encoded = base64.b64encode(image.data).decode("ascii")
    predict_file = _json_file(workdir / "peer_predict.json", {"image": encoded, "top_k": 5})
    ig = all_methods()["integrated_gradients"].params_model().model_dump()
    lanes = result["lanes"]
    settings = litserve_settings(served, lanes)
    peers = result["peers"] = {"predict": [], "explain": []}
    peers["settings"] = {"rounds": options.peer_rounds, "litserve": settings,
                         "plain": {"threads": "torch's default", "route": "def"},
                         "request": f"JSON, the photo as base64 ({len(predict_file.read_bytes())} bytes), top_k 5"}

    def peer(command: Callable[[int], list[str]], log_name: str) -> Callable[[], ServerProcess]:
        return lambda: ServerProcess(None, workdir, command=command, ready_path="/health", log_name=log_name,
                                     ready_timeout_s=300)

    start_plain = peer(plain_command(model, served, ig), "plain.log")
    systems: list[tuple[str, Callable[[], ServerProcess] | None, str]] = [
        (OURS, None, f"/v1/models/{model['id']}/predict"),
        (LITSERVE, peer(litserve_command(model, served, settings), "litserve.log"), "/predict"),
        (PLAIN, start_plain, "/predict"),
    ]
    for round_index in range(options.peer_rounds if "peers" not in options.skip else 0):
        # every other round in reverse order, so a drift of the machine's speed favours no system
        for system, start, path in (systems if round_index % 2 == 0 else systems[::-1]):
            points = [load_point(system, path, c, predict_file, "application/json", options)
                      for c in options.concurrency]
            progress(f"{model['id']}: peers round {round_index + 1}/{options.peer_rounds}: {system} at "
                     f"{options.concurrency} clients")
            # Each peer runs only during its own points, so an idle peer never takes CPU from another system.
            with (start() if start is not None else contextlib.nullcontext(server)) as target:
                for outcome in run_load(target, points, workdir, load_timeout(points)):
                    outcome["system"], outcome["round"] = outcome.pop("name"), round_index + 1
                    if start is not None:
                        outcome["startup_s"] = target.startup_s
                    peers["predict"].append(outcome)

    if "explain_peers" in options.skip:
        return
    applicable = [m for m in EXPLAIN_METHODS if served.family in all_methods()[m].families]
    raw = {"format": ["raw"], "space": "input"}
    requests = [
        ("integrated_gradients", ["integrated_gradients"], "/explain/integrated_gradients",
         f"Captum IntegratedGradients per request ({ig['steps']} steps, {ig['integration']}, black baseline)"),
        ("+".join(applicable), applicable, "/explain/methods",
         "the reference libraries one after another: " + ", ".join(
             {"saliency": "Captum Saliency", "input_x_gradient": "Captum InputXGradient",
              "gradcam": "pytorch-grad-cam GradCAM", "gae": "per-image GAE loop"}[m] for m in applicable)),
    ]
    progress(f"{model['id']}: /explain against the per-request reference handler at "
             f"{options.explain_http_concurrency} clients")
    with start_plain() as plain:
        for name, methods, peer_path, reference in requests:
            ours_file = _json_file(workdir / f"peer_explain_{len(methods)}.json",
                                   {"image": encoded, "top_k": 5, "methods": methods, "output": raw})
            peer_file = _json_file(workdir / "peer_explain_reference.json", {"image": encoded, "top_k": 5})
            # integrated gradients runs the model 33 times per image (seconds per request on a CPU): a window
            # three times as long, so that several answers complete in it at every client count
            window = options.duration_s * (3 if name == "integrated_gradients" else 1)
            for concurrency in options.explain_http_concurrency:
                ours_point = load_point(OURS, f"/v1/models/{model['id']}/explain", concurrency, ours_file,
                                        "application/json", options)
                their_point = load_point(reference, peer_path, concurrency, peer_file, "application/json", options)
                ours_point["duration_s"] = their_point["duration_s"] = window
                ours = run_load(server, [ours_point], workdir, load_timeout([ours_point]))[0]
                theirs = run_load(plain, [their_point], workdir, load_timeout([their_point]))[0]
                peers["explain"].append({"request": name, "reference": reference, "concurrency": concurrency,
                                         "ours": ours, "theirs": theirs})
