"""One batch of explanation jobs: a recording forward pass, one backward pass per target slot, then each
requested method's tensor work over the sub-batch of images that asked for it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
from pydantic import BaseModel

from service.explain.captures import CaptureBatch, CaptureNeeds, ModelAnatomy, record
from service.explain.registry import ExplainMethod
from service.explain.targets import TargetRequest
from service.served_model import ServedModel


@dataclass(frozen=True)
class MethodRequest:
    """A method with validated params; `key` groups identical requests across a batch."""

    method: ExplainMethod
    params: BaseModel
    needs: CaptureNeeds

    @property
    def key(self) -> str:
        return f"{self.method.name}:{self.params.model_dump_json()}"


@dataclass(frozen=True)
class ExplainJob:
    """One image to explain with several methods."""

    pixels: torch.Tensor  # (C, H, W) float32, normalised
    methods: tuple[MethodRequest, ...]
    target: TargetRequest


@dataclass
class MethodMaps:
    """One method's maps for one image: one per target (a single one for class-agnostic methods)."""

    maps: list[torch.Tensor]  # (h, w) each, float32, CPU
    layers: list[torch.Tensor | None]  # (L, h, w) each, or None
    layer_indices: tuple[int, ...] | None
    compute_ms: float


@dataclass
class ExplainOutcome:
    """Everything computed for one job."""

    probabilities: torch.Tensor  # (classes,)
    targets: list[int]
    methods: list[MethodMaps]  # in the job's method order


def _finite(maps: torch.Tensor) -> torch.Tensor:
    """float32 on the CPU, with NaN and infinities (degenerate inputs) replaced so maps stay renderable."""
    return torch.nan_to_num(maps.detach().float(), nan=0.0, posinf=0.0, neginf=0.0).cpu()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward(served: ServedModel, pixels: torch.Tensor, needs: CaptureNeeds) -> tuple[torch.Tensor, list, dict]:
    with record(served.module, needs) as recording, torch.set_grad_enabled(needs.any_grad):
        batch = pixels.to(device=served.device, dtype=served.dtype)
        if needs.any_grad:
            batch.requires_grad_(True)
        logits = served.module(batch)
    return logits, recording.attentions, recording.layers


def _target_gradients(
    logits: torch.Tensor, attentions: list[torch.Tensor], layers: dict[str, torch.Tensor], needs: CaptureNeeds,
    slot_targets: torch.Tensor, images: torch.Tensor, retain_graph: bool,
) -> tuple[list[torch.Tensor] | None, dict[str, torch.Tensor]]:
    """Gradients of each listed image's own target logit (summed: images are independent in eval mode)."""
    score = logits.index_select(0, images).gather(1, slot_targets.index_select(0, images)[:, None]).sum()
    layer_names = sorted(needs.layer_grads)
    inputs = (attentions if needs.attention_grad else []) + [layers[name] for name in layer_names]
    grads = torch.autograd.grad(score, inputs, retain_graph=retain_graph, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
    n_attn = len(attentions) if needs.attention_grad else 0
    attention_grads = [g.detach().float() for g in grads[:n_attn]] if needs.attention_grad else None
    return attention_grads, {name: g.detach().float() for name, g in zip(layer_names, grads[n_attn:])}


def run_explain_batch(served: ServedModel, anatomy: ModelAnatomy, jobs: Sequence[ExplainJob]) -> list[ExplainOutcome]:
    """Explain a batch of jobs (runs on the model's device worker thread)."""
    needs = CaptureNeeds()
    for job in jobs:
        for request in job.methods:
            needs = needs | request.needs
    pixels = torch.stack([job.pixels for job in jobs])
    logits, attentions, layers = _forward(served, pixels, needs)
    captures = CaptureBatch(
        logits=logits.detach().float(),
        attentions=[a.detach().float() for a in attentions],
        layers={name: t.detach().float() for name, t in layers.items()},
    )
    targets = [job.target.resolve(captures.logits[i]) for i, job in enumerate(jobs)]
    outcomes = [
        ExplainOutcome(probabilities=captures.logits[i].softmax(-1).cpu(), targets=targets[i],
                       methods=[None] * len(job.methods))  # type: ignore[list-item]
        for i, job in enumerate(jobs)
    ]

    groups: dict[str, tuple[MethodRequest, list[tuple[int, int]]]] = {}
    for i, job in enumerate(jobs):
        for m, request in enumerate(job.methods):
            groups.setdefault(request.key, (request, []))[1].append((i, m))

    # Gradients per target slot: slot s is each image's s-th target.
    class_specific_images = sorted({i for request, members in groups.values() if request.method.class_specific
                                    for i, _ in members})
    n_slots = max((len(targets[i]) for i in class_specific_images), default=0)
    slot_captures: list[CaptureBatch] = []
    for slot in range(n_slots):
        in_slot = [i for i in class_specific_images if len(targets[i]) > slot]
        slot_targets = torch.tensor([t[slot] if len(t) > slot else 0 for t in targets], device=logits.device)
        attention_grads, layer_grads = _target_gradients(
            logits, attentions, layers, needs, slot_targets, torch.tensor(in_slot, device=logits.device),
            retain_graph=slot < n_slots - 1,
        )
        slot_captures.append(captures.with_gradients(attention_grads, layer_grads, slot_targets))
    del logits, attentions, layers

    for request, members in groups.values():
        method = request.method
        per_member: dict[tuple[int, int], MethodMaps] = {
            member: MethodMaps(maps=[], layers=[], layer_indices=None, compute_ms=0.0) for member in members
        }
        passes = (
            [(slot, [mb for mb in members if len(targets[mb[0]]) > slot], slot_captures[slot]) for slot in range(n_slots)]
            if method.class_specific else [(0, members, captures)]
        )
        for _, slot_members, source in passes:
            if not slot_members:
                continue
            started = time.perf_counter()
            index = torch.tensor([i for i, _ in slot_members])
            output = method.compute(source.select(index), request.params, anatomy)
            maps = _finite(output.maps)
            layer_maps = None if output.layers is None else _finite(output.layers)
            _synchronize(served.device)
            elapsed_ms = (time.perf_counter() - started) * 1000.0
            for row, member in enumerate(slot_members):
                result = per_member[member]
                result.maps.append(maps[row])
                result.layers.append(None if layer_maps is None else layer_maps[row])
                result.layer_indices = output.layer_indices
                result.compute_ms += elapsed_ms
        for (i, m), result in per_member.items():
            outcomes[i].methods[m] = result
    return outcomes
