"""Helpers for the tests of the per-image methods: a small CNN, pipeline runs with a chosen chunk size."""

from __future__ import annotations

from typing import Any

import torch

from api_schemas import MethodSpec
from service.config import ModelConfig, ServerSettings
from service.explain.captures import ModelRunner
from service.explain.requests import resolve_methods
from service.explain.pipeline import ExplainJob, ExplainOutcome, run_explain_batch
from service.explain.targets import TargetRequest
from service.model.served import ServedModel, load_served_model


def small_model(
    architecture: str, kwargs: dict[str, Any], size: int | None = None, seed: int = 0, **data_config: Any
) -> ServedModel:
    """A random-weights model, optionally at a smaller input size (CNNs accept any) and other data config."""
    torch.manual_seed(seed)
    if size:
        data_config["input_size"] = (3, size, size)
    config = ModelConfig(id="m", architecture=architecture, weights="random", model_kwargs=kwargs,
                         data_config=data_config)
    return load_served_model(config, ServerSettings(models=[config]))


def explain_chunked(
    served: ServedModel, pixels: torch.Tensor, methods: list[str | dict], targets: list[TargetRequest],
    chunk_size: int = 32,
) -> list[ExplainOutcome]:
    """The pipeline on a batch with a given internal chunk size."""
    specs = [m if isinstance(m, str) else MethodSpec(**m) for m in methods]
    requests = resolve_methods(specs, served.family, served.anatomy)
    jobs = [ExplainJob(pixels[i], requests, targets[i]) for i in range(pixels.shape[0])]
    return run_explain_batch(served, jobs, chunk_size=chunk_size)


class RecordRunnerCalls:
    """Records how many images each call to the runner (logits, input_gradients) gets."""

    def __init__(self, monkeypatch) -> None:
        self.sizes: list[int] = []
        for name in ("logits", "input_gradients"):
            original = getattr(ModelRunner, name)

            def wrapped(runner, pixels, *args, _original=original):
                self.sizes.append(pixels.shape[0])
                return _original(runner, pixels, *args)

            monkeypatch.setattr(ModelRunner, name, wrapped)


def stack_maps(outcomes: list[ExplainOutcome], method: int = 0, slot: int = 0) -> torch.Tensor:
    return torch.stack([o.methods[method].maps[slot] for o in outcomes])
