"""Helpers for explanation tests: tiny random-weights models of each token layout, direct pipeline runs."""

from __future__ import annotations

from typing import Any

import torch

from api_schemas import MethodSpec
from service.config import ModelConfig, ServerSettings
from service.explain.captures import ModelRunner
from service.explain.pipeline import ExplainJob, ExplainOutcome, run_explain_batch
from service.explain.requests import resolve_methods
from service.explain.targets import TargetRequest
from service.model.served import ServedModel, load_served_model
from tests.helpers import TINY_VIT_KWARGS

TINY = dict(embed_dim=32, depth=3, num_heads=2, num_classes=10)

VIT_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit": ("vit_tiny_patch16_224", dict(TINY_VIT_KWARGS, depth=3)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(TINY, img_size=32, patch_size=8)),
    "registers_nonsquare": ("vit_small_patch16_224", dict(TINY, img_size=(32, 48), patch_size=8, reg_tokens=4)),
    "patch14": ("vit_small_patch14_dinov2", dict(TINY, img_size=28, patch_size=14, num_classes=10)),
    "patch16_48px": ("vit_tiny_patch16_224", dict(TINY, img_size=48, patch_size=16)),
    "patch32_nonsquare": ("vit_base_patch32_224", dict(TINY, img_size=(64, 96), patch_size=32)),
}


def served_model(
    architecture: str, kwargs: dict[str, Any], seed: int = 0, size: int | None = None, **data_config: Any
) -> ServedModel:
    """A random-weights model (weights drawn after seeding torch with `seed`), optionally at a smaller square input
    `size` (CNNs accept any) and with other data config overrides (mean, std...)."""
    torch.manual_seed(seed)
    if size:
        data_config["input_size"] = (3, size, size)
    config = ModelConfig(id="m", architecture=architecture, weights="random", model_kwargs=kwargs,
                         data_config=data_config)
    return load_served_model(config, ServerSettings(models=[config]))


def explain_direct(
    served: ServedModel, pixels: torch.Tensor, methods: list[str | dict], target: TargetRequest | None = None,
    targets: list[TargetRequest] | None = None, chunk_size: int | None = None,
) -> list[ExplainOutcome]:
    """Run the explain pipeline on a batch directly (no HTTP, no queue): every image gets `target` (default top1)
    or its own entry of `targets`; perturbation methods run the model on at most `chunk_size` images at a time."""
    specs = [m if isinstance(m, str) else MethodSpec(**m) for m in methods]
    requests = resolve_methods(specs, served.family, served.anatomy)
    targets = targets or [target or TargetRequest(top_k=1)] * pixels.shape[0]
    jobs = [ExplainJob(pixels[i], requests, targets[i]) for i in range(pixels.shape[0])]
    return run_explain_batch(served, jobs, chunk_size=chunk_size)


def random_pixels(served: ServedModel, batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *served.input_size), generator=generator)


def stack_maps(outcomes: list[ExplainOutcome], method: int = 0, slot: int = 0) -> torch.Tensor:
    """One method's maps for one target slot, stacked over the batch: (B, h, w)."""
    return torch.stack([o.methods[method].maps[slot] for o in outcomes])


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
