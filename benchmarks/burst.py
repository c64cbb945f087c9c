"""A mixed burst with known answers: distinct images, predictions and explanations (several methods and targets) on
several models, sent at once; every answer is checked against one computed beforehand in process, image by image.

Nothing lost (every request answers 200), nothing mixed up (each answer is its own image's: top classes and
probabilities, explained targets, and every map after min-max normalisation). `tests/test_mixed_burst.py` runs a
small burst in the suite; for a longer one against a real server on loopback:

    python -m benchmarks.burst --requests 400 --concurrency 32

(two tiny random-weights models, handed to the server as weight files, unless `--config FILE`.)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import io
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# Method lists an explain request may carry, by model family (cheap params: a burst checks routing, not speed).
EXPLAIN_METHODS: dict[str, list[list[Any]]] = {
    "vit": [["rollout", "gradcam"], ["raw_attention"], ["saliency", {"name": "grad_rollout"}],
            [{"name": "integrated_gradients", "params": {"steps": 4}}, "gae"]],
    "cnn": [["gradcam", "layercam"], ["saliency"], ["cam", "input_x_gradient"],
            [{"name": "integrated_gradients", "params": {"steps": 4}}]],
}
TARGETS: list[Any] = ["top1", {"top_k": 2}, 3, 7]
MAP_TOLERANCE = 1e-3  # on maps min-max normalised to [0, 1]
PROBABILITY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class BurstCase:
    """One request of the burst."""

    number: int
    model_id: str
    endpoint: str  # predict | explain
    image_seed: int
    methods: list[Any] = field(default_factory=list)
    target: Any = "top1"
    top_k: int = 3

    def body(self, image: bytes) -> dict[str, Any]:
        body: dict[str, Any] = {"image": base64.b64encode(image).decode("ascii"), "top_k": self.top_k}
        if self.endpoint == "explain":
            body |= {"methods": self.methods, "target": self.target,
                     "output": {"format": ["raw"], "space": "tokens"}}
        return body


@functools.cache  # encoded once: for the expected answers, then reused inside the timed burst
def image_bytes(seed: int, size: tuple[int, int] = (56, 48)) -> bytes:
    """A distinct PNG per seed: smooth random colour fields (varied enough that models disagree between images)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def plan(count: int, families: dict[str, str], seed: int = 0) -> list[BurstCase]:
    """`count` requests over the models (id -> family), alternating predict and explain, each on its own image."""
    rng = random.Random(seed)
    ids = sorted(families)
    cases = []
    for number in range(count):
        model_id = ids[number % len(ids)]
        if rng.random() < 0.4:
            cases.append(BurstCase(number, model_id, "predict", image_seed=1000 + number, top_k=rng.choice([1, 3, 5])))
        else:
            cases.append(BurstCase(number, model_id, "explain", image_seed=1000 + number,
                                   methods=rng.choice(EXPLAIN_METHODS[families[model_id]]),
                                   target=rng.choice(TARGETS), top_k=3))
    return cases


@dataclass
class Expected:
    """The answer computed in process, one image at a time (no HTTP, no queue, no batch)."""

    top: list[tuple[int, float]]  # (class, probability), best first
    maps: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (method, slot) -> normalised map
    targets: list[int] = field(default_factory=list)


def normalised(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def expected_answer(case: BurstCase, served: Any, image: bytes, max_image_pixels: int = 40_000_000) -> Expected:
    """What the server must answer for `case`, computed directly on the model."""
    from api_schemas import ExplainOptions
    from service.explain.pipeline import ExplainJob, run_explain_batch
    from service.explain.requests import resolve_methods
    from service.explain.targets import parse_target
    from service.http.uploads import decode_image

    pixels = served.preprocess(decode_image(image, max_image_pixels))[None]
    probabilities = served.predict_probabilities(pixels)[0]
    values, indices = probabilities.topk(case.top_k)
    top = list(zip(indices.tolist(), values.tolist()))
    if case.endpoint == "predict":
        return Expected(top)
    options = ExplainOptions.model_validate({"methods": case.methods, "target": case.target})
    requests = resolve_methods(options.methods, served.family, served.anatomy)
    target = parse_target(options.target, served.labels)
    (outcome,) = run_explain_batch(served, [ExplainJob(pixels[0], requests, target)])
    maps = {(m, slot): normalised(saliency.numpy().astype(np.float64))
            for m, method_maps in enumerate(outcome.methods) for slot, saliency in enumerate(method_maps.maps)}
    return Expected(top, maps, outcome.targets)


def mismatches(case: BurstCase, status: int, answer: dict[str, Any], expected: Expected) -> list[str]:
    """Every way the answer differs from the expected one (empty when it is right)."""
    where = f"request {case.number} ({case.endpoint} on {case.model_id})"
    if status != 200:
        return [f"{where}: status {status}: {json.dumps(answer)[:300]}"]
    problems = []
    got = [(p["index"], p["probability"]) for p in answer["predictions"]]
    if [i for i, _ in got] != [i for i, _ in expected.top]:
        problems.append(f"{where}: top classes {[i for i, _ in got]}, expected {[i for i, _ in expected.top]}")
    elif any(abs(a - b) > PROBABILITY_TOLERANCE for (_, a), (_, b) in zip(got, expected.top)):
        problems.append(f"{where}: probabilities {got}, expected {expected.top}")
    if case.endpoint == "explain":
        for m, result in enumerate(answer["explanations"]):
            targets = [r["target"]["index"] for r in result["results"] if r["target"] is not None]
            if targets and targets != expected.targets:
                problems.append(f"{where}: {result['method']} explained {targets}, expected {expected.targets}")
            for slot, explained in enumerate(result["results"]):
                raw = explained["map"]["raw"]
                values = np.frombuffer(base64.b64decode(raw["data"]), dtype="<f4").reshape(raw["shape"])
                want = expected.maps[(m, slot)]
                diff = float(np.abs(normalised(values.astype(np.float64)) - want).max()) if values.shape == want.shape \
                    else float("inf")
                if diff > MAP_TOLERANCE:
                    problems.append(f"{where}: {result['method']} map {slot} differs by {diff:.2e}")
    return problems


@dataclass
class BurstReport:
    requests: int
    answered: int
    lost: list[str]
    mismatched: list[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.lost and not self.mismatched and self.answered == self.requests


async def run_burst(client: Any, cases: list[BurstCase], expected: dict[int, Expected], concurrency: int) -> BurstReport:
    """Send every case with at most `concurrency` in flight (an httpx.AsyncClient) and check each answer."""
    gate = asyncio.Semaphore(concurrency)
    lost: list[str] = []
    mismatched: list[str] = []
    answered = 0

    async def one(case: BurstCase) -> None:
        nonlocal answered
        async with gate:
            try:
                response = await client.post(f"/v1/models/{case.model_id}/{case.endpoint}",
                                             json=case.body(image_bytes(case.image_seed)))
            except Exception as exc:  # noqa: BLE001 - a lost request is reported, not raised
                lost.append(f"request {case.number}: {type(exc).__name__}: {exc}")
                return
        answered += 1
        mismatched.extend(mismatches(case, response.status_code, response.json(), expected[case.number]))

    started = time.perf_counter()
    await asyncio.gather(*(one(case) for case in cases))
    return BurstReport(len(cases), answered, lost, mismatched, time.perf_counter() - started)


def tiny_models() -> list[dict[str, Any]]:
    """Two small random-weights models, one per family."""
    return [
        {"id": "burst_vit", "architecture": "vit_tiny_patch16_224", "weights": "random", "max_batch_size": 8,
         "model_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
                          "num_classes": 10}},
        {"id": "burst_cnn", "architecture": "test_resnet", "weights": "random", "max_batch_size": 8,
         "model_kwargs": {"num_classes": 10}, "data_config": {"input_size": [3, 64, 64]}},
    ]


def main(argv: list[str] | None = None) -> int:
    import httpx
    import torch

    from benchmarks.server import ServerProcess, write_config
    from service.config import ModelConfig, ServerSettings, load_settings
    from service.model.served import load_served_model

    parser = argparse.ArgumentParser(prog="python -m benchmarks.burst", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--config", help="serve these models instead of two tiny random-weights ones")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        settings = load_settings(args.config) if args.config else ServerSettings(
            log_level="warning", models=[ModelConfig(**m) for m in tiny_models()])
        torch.manual_seed(args.seed)
        served = {cfg.id: load_served_model(cfg, settings) for cfg in settings.models}
        # The server gets exactly these weights: random ones are handed over as files.
        models = []
        for cfg in settings.models:
            entry = cfg.model_dump(mode="json", exclude_none=True)
            if served[cfg.id].weights.random:
                path = workdir / f"{cfg.id}.pt"
                torch.save(served[cfg.id].network.state_dict(), path)
                entry |= {"weights": f"file:{path}", "fallback": "none"}
            models.append(entry)
        server_keys = settings.model_dump(mode="json", exclude={"models", "host", "port"}, exclude_none=True)
        config_path = write_config(workdir / "burst.yaml", server_keys, models)
        cases = plan(args.requests, {i: s.family for i, s in served.items()}, seed=args.seed)
        print(f"computing {len(cases)} answers in process...", file=sys.stderr)
        expected = {c.number: expected_answer(c, served[c.model_id], image_bytes(c.image_seed)) for c in cases}
        with ServerProcess(config_path, workdir) as server:
            async def go() -> BurstReport:
                async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as client:
                    return await run_burst(client, cases, expected, args.concurrency)

            report = asyncio.run(go())
    print(f"{report.requests} requests, {report.answered} answered in {report.seconds:.1f} s at concurrency "
          f"{args.concurrency}: {len(report.lost)} lost, {len(report.mismatched)} mismatched")
    for line in (report.lost + report.mismatched)[:20]:
        print("  " + line)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
